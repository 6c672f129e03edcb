"""The adapter life cycle (load, re-save, disable, unload, two adapters on one base) and the
failures a user meets one step past the method tests: each leaves the model as it was."""
import json

import pytest
import torch
from helpers import tiny_lm
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_peft import inputs, make, perturb, run, snapshot

from mambapeft.io import CheckpointError
from mambapeft.models import MambaForCausalLM, VisionMamba
from mambapeft.peft import PeftConfig, PeftModel, get_peft_model

METHODS = {"lora_X": {"dora": True}, "prompt": {"tokens": 2}, "affix": {}, "additional_scan": {},
           "parallel_adapter": {}, "D": {}, "lora_embed": {}}


def base_model(kind="lm"):
    torch.manual_seed(0)   # one base for every adapter of a test
    return make(kind)


def trained(kind, tmp_path, methods=METHODS, seed=0):
    base = base_model(kind)
    torch.manual_seed(seed)
    peft = get_peft_model(base, PeftConfig(methods))
    perturb(peft)
    peft.save_pretrained(tmp_path)
    return peft


def test_loaded_adapter_saves_again_with_every_tensor(tmp_path):
    trained("lm", tmp_path / "a")
    base = tiny_lm()
    loaded = PeftModel.from_pretrained(base, tmp_path / "a")       # inference only: nothing trains
    assert not any(p.requires_grad for p in base.parameters())
    loaded.save_pretrained(tmp_path / "b")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


def test_merged_model_with_unmerged_methods_refuses_to_save(tmp_path):
    peft = trained("lm", tmp_path / "a", {"lora_X": {}, "prompt": {}})
    merged = peft.merge_and_unload(strict=False)
    with pytest.raises(ValueError, match="still carries PEFT modules \\(prompt\\)"):
        merged.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("kind", ["lm", "vim"])
def test_failed_load_leaves_the_model_as_it_was(kind, tmp_path):
    trained(kind, tmp_path / "a", {"affix": {}, "lora_X": {}})
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    base = make(kind)
    state, flags, x = snapshot(base), [p.requires_grad for p in base.parameters()], inputs(kind)
    with torch.no_grad():
        before = run(base, x)
    for _ in range(2):   # and a retry fails the same way
        with pytest.raises(CheckpointError, match="adapter_model.safetensors: file not found"):
            PeftModel.from_pretrained(base, tmp_path / "a")
    assert snapshot(base).keys() == state.keys() and [p.requires_grad for p in base.parameters()] == flags
    with torch.no_grad():
        torch.testing.assert_close(run(base, x), before, rtol=0, atol=0)


def test_failed_load_of_mismatched_tensors_and_second_wrapper_leave_the_model(tmp_path):
    peft = trained("lm", tmp_path / "a", {"lora_X": {}})
    path = tmp_path / "a" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(dict(list(load_file(path).items())[1:]), path, metadata=meta)   # one tensor short
    base = tiny_lm()
    keys = snapshot(base).keys()
    with pytest.raises(CheckpointError, match="tensors do not match"):
        PeftModel.from_pretrained(base, tmp_path / "a")
    assert snapshot(base).keys() == keys and all(p.requires_grad for p in base.parameters())
    # a second get_peft_model on a wrapped model fails and leaves the first wrapper working
    trainable = [p for p in peft.base_model.parameters() if p.requires_grad]
    keys = snapshot(peft.base_model).keys()
    with pytest.raises(ValueError, match="already carries an adapter 'lora_X'.*load_adapter"):
        get_peft_model(peft.base_model, PeftConfig({"lora_d": {}, "lora_X": {}}))
    assert snapshot(peft.base_model).keys() == keys
    assert [p for p in peft.base_model.parameters() if p.requires_grad] == trainable


def test_adapter_files_are_a_pair(tmp_path):
    trained("lm", tmp_path / "a", {"lora_X": {}})
    trained("lm", tmp_path / "b", {"lora_X": {}}, seed=1)
    # a save killed between its two files: new weights beside the old config
    (tmp_path / "b" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match="written by another save"):
        PeftModel.from_pretrained(tiny_lm(), tmp_path / "b")
    # a stray temporary of a killed save is cleared by the next save; a file is no directory
    stray = tmp_path / "a" / ".adapter_model.safetensors.tmp123"
    stray.write_bytes(b"partial")
    trained("lm", tmp_path / "a", {"lora_X": {}})
    assert not stray.exists()
    with pytest.raises(CheckpointError, match="expected a directory.*got a file"):
        get_peft_model(tiny_lm(), PeftConfig({"lora_X": {}})).save_pretrained(tmp_path / "a" / "adapter_config.json")


def test_pretrained_models_load_in_eval_mode(tmp_path):
    lm = tiny_lm()
    lm.save_pretrained(tmp_path / "lm")
    vim = make("vim")
    vim.save_pretrained(tmp_path / "vim")
    assert not MambaForCausalLM.from_pretrained(tmp_path / "lm").training
    assert not VisionMamba.from_pretrained(tmp_path / "vim").training


@pytest.mark.parametrize("kind", ["lm", "vim"])
def test_unload_gives_back_the_base_bitwise_and_disable_gives_its_outputs(kind, tmp_path):
    base = make(kind)
    state, flags, x = snapshot(base), [p.requires_grad for p in base.parameters()], inputs(kind)
    with torch.no_grad():
        before = run(base, x)
    peft = get_peft_model(base, PeftConfig(METHODS if kind == "lm" else {**METHODS, "pos": {}}))
    perturb(peft)
    with torch.no_grad():
        tuned = run(peft, x)
        with peft.disable_adapters():
            torch.testing.assert_close(run(peft, x), before, rtol=0, atol=0)
        torch.testing.assert_close(run(peft, x), tuned, rtol=0, atol=0)   # back on afterwards
    back = peft.unload()
    assert back is base and back.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items())
    assert [p.requires_grad for p in base.parameters()] == flags
    with torch.no_grad():
        torch.testing.assert_close(run(back, x), before, rtol=0, atol=0)


def test_two_adapters_on_one_base_each_give_their_own_outputs(tmp_path):
    first = trained("lm", tmp_path / "a", METHODS, seed=1)
    second = trained("lm", tmp_path / "b", {"lora_X": {}, "affix": {"tokens": 2}, "A": {}}, seed=2)
    x = inputs("lm")
    with torch.no_grad():
        want_a, want_b = run(first, x), run(second, x)
    peft = PeftModel.from_pretrained(base_model(), tmp_path / "a")
    assert not peft.training and not peft.base_model.training          # inference-only: eval mode
    peft.load_adapter(tmp_path / "b", "b")
    with torch.no_grad():
        torch.testing.assert_close(run(peft, x), want_a, rtol=1e-6, atol=1e-6)   # still the first
        peft.set_adapter("b")
        torch.testing.assert_close(run(peft, x), want_b, rtol=1e-6, atol=1e-6)
        peft.set_adapter("default")
        torch.testing.assert_close(run(peft, x), want_a, rtol=1e-6, atol=1e-6)
    # each saves under its own names, as it was loaded
    peft.save_pretrained(tmp_path / "b2", adapter_name="b")
    b, b2 = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("b", "b2"))
    assert b.keys() == b2.keys() and all(torch.equal(b[k], b2[k]) for k in b)
    assert json.loads((tmp_path / "b2" / "adapter_config.json").read_text())["methods"].keys() == {"lora_X", "affix",
                                                                                                   "A"}
    with pytest.raises(ValueError, match="already loaded"):
        peft.load_adapter(tmp_path / "b", "b")
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        peft.set_adapter("c")

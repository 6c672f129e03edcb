"""FalconMamba (model_type falcon_mamba): Mamba-1 with weightless RMS norms on dt, B and C.

Against transformers' FalconMambaForCausalLM on the same random weights: forward, padded batches,
decoding, both checkpoint directions, merge. Every method's life cycle on it runs in test_peft.py
(kind "falcon"); here what is particular to it: the norms matter, Additional-scan's promise, the
refusal of a Mamba adapter, bf16 loading with a frozen base.
"""
import json

import pytest
import torch
from helpers import decode_stepwise, hf_tiny_falcon, tiny_falcon, tiny_lm

from mambapeft.io import CheckpointError
from mambapeft.models import MambaConfig, MambaForCausalLM
from mambapeft.ops.scan import scan_backend
from mambapeft.peft import PeftConfig, PeftModel, get_peft_model

BACKENDS = ["reference", "cpu", "chunked"]


def perturb(peft, scale=0.05):
    with torch.no_grad():
        for p in peft.method_of:
            p.add_(torch.randn_like(p) * scale)


def left_padded():
    ids = torch.randint(1, 97, (2, 13))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    return ids, mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_equal_transformers_forward_padding_decoding(tmp_path, backend):
    torch.manual_seed(0)
    hf = hf_tiny_falcon(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf")
    ours = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.mixer_rms_eps == 1e-6 and not ours.config.tie_word_embeddings
    ids, mask = left_padded()
    with torch.no_grad(), scan_backend(backend):
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
        hf_padded = hf(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, mask).logits[mask.bool()], hf_padded[mask.bool()],
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decode_stepwise(ours, ids, 4), expected, rtol=1e-4, atol=1e-4)
        # transformers' own recurrent decoding: the same greedy tokens and step logits
        gen = hf.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        mine = ours.generate(ids[:1, :6], max_new_tokens=5, eos_token_id=-1)
        assert torch.equal(mine, gen.sequences)
        torch.testing.assert_close(ours(mine).logits[:, 5:-1], torch.stack(gen.logits, 1), rtol=1e-4, atol=1e-4)
        # the norms matter: the same weights read as plain Mamba give other logits
        plain = MambaForCausalLM(MambaConfig(**{**vars(ours.config), "mixer_rms_eps": None}), init=False)
        plain.load_state_dict(ours.state_dict())
        assert (plain(ids).logits - expected).abs().max() > 1e-2


def test_saved_model_is_transformers_falcon_mamba(tmp_path):
    import transformers
    ours = tiny_falcon()
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "falcon_mamba" and config["mixer_rms_eps"] == 1e-6
    assert config["architectures"] == ["FalconMambaForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "FalconMambaForCausalLM"
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    plain = tiny_lm()
    plain.save_pretrained(tmp_path / "plain")
    plain_config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert plain_config["model_type"] == "mamba" and "mixer_rms_eps" not in plain_config


def test_config_errors():
    with pytest.raises(ValueError, match="cfg.json: mixer_rms_eps='x'; expected a positive number"):
        MambaConfig.from_dict({"model_type": "falcon_mamba", "hidden_size": 8, "mixer_rms_eps": "x"}, "cfg.json")
    with pytest.raises(ValueError, match="model_type='mamba2'; expected 'mamba' .* or 'falcon_mamba'"):
        MambaConfig.from_dict({"model_type": "mamba2", "hidden_size": 8})
    assert MambaConfig.from_dict({"model_type": "falcon_mamba", "hidden_size": 8}).mixer_rms_eps == 1e-6
    # a Mamba config that happens to carry the field stays Mamba
    assert MambaConfig.from_dict({"model_type": "mamba", "hidden_size": 8, "mixer_rms_eps": 1e-6}).mixer_rms_eps is None


def test_merge_writes_a_model_transformers_loads_with_the_same_logits(tmp_path):
    import transformers
    peft = get_peft_model(tiny_falcon(), PeftConfig({"lora_embed": {}, "lora_X": {}, "lora_x_proj": {"dora": True},
                                                     "lora_dt": {}, "lora_out_proj": {}, "A": {}, "conv1d": {},
                                                     "bias": {}}))
    perturb(peft)
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        tuned = peft(x).logits
    peft.merge_and_unload().save_pretrained(tmp_path)
    hf = transformers.FalconMambaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, tuned, rtol=1e-4, atol=1e-4)


def test_adapters_refuse_the_other_family(tmp_path):
    get_peft_model(tiny_falcon(), PeftConfig({"lora_X": {}})).save_pretrained(tmp_path / "falcon")
    get_peft_model(tiny_lm(), PeftConfig({"lora_X": {}})).save_pretrained(tmp_path / "mamba")
    with pytest.raises(CheckpointError, match="another base model.*mixer_rms_eps: adapter 1e-06, model None"):
        PeftModel.from_pretrained(tiny_lm(), tmp_path / "falcon")
    with pytest.raises(CheckpointError, match="another base model.*mixer_rms_eps: adapter None, model 1e-06"):
        PeftModel.from_pretrained(tiny_falcon(), tmp_path / "mamba")
    PeftModel.from_pretrained(tiny_falcon(), tmp_path / "falcon")


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_additional_scan_keeps_its_promise(position):
    """The model's own N columns of B and C are normalised over those N, exactly as in FalconMamba; the
    added columns stay raw. So zero C rows leave the output unchanged, whatever the B rows hold."""
    from mambapeft.models.mixer import ssm_inputs, weightless_rms_norm
    base = tiny_falcon()
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        before = base(x).logits
    peft = get_peft_model(base, PeftConfig({"additional_scan": {"states": 3, "position": position}}))
    with torch.no_grad():
        for m in base.backbone.layers:
            m.mixer.peft["additional_scan"].x_proj.weight[3:].zero_()   # X_C; X_B keeps its random init
        torch.testing.assert_close(peft(x).logits, before, rtol=1e-6, atol=1e-6)
    m = base.backbone.layers[0].mixer
    s = m.compose().dirs[0]
    u = torch.randn(5, m.d_inner)
    dt, B, C = ssm_inputs(s, u @ s.x_proj.t())
    raw = u @ m.x_proj.weight.t()
    own = slice(3, 19) if position == "prefix" else slice(0, 16)
    new = slice(0, 3) if position == "prefix" else slice(16, 19)
    torch.testing.assert_close(dt, weightless_rms_norm(raw[:, :4], 1e-6))
    torch.testing.assert_close(B[:, own], weightless_rms_norm(raw[:, 4:20], 1e-6))
    torch.testing.assert_close(C[:, own], weightless_rms_norm(raw[:, 20:], 1e-6))
    added = u @ m.peft["additional_scan"].x_proj.weight.t()
    torch.testing.assert_close(B[:, new], added[:, :3])
    assert not C[:, new].any()


def test_all_methods_agree_on_every_cpu_backend():
    from test_peft import ALL_LM
    peft = get_peft_model(tiny_falcon(), PeftConfig(ALL_LM))
    perturb(peft)
    x = torch.randint(0, 97, (2, 11))
    results = []
    for backend in BACKENDS:
        peft.zero_grad()
        with scan_backend(backend):
            out = peft(x).logits
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in peft.base_model.named_parameters()
                                        if p.requires_grad}))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-5)
        for n, g in results[0][1].items():
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_load_keeps_the_base_frozen(tmp_path):
    tiny_falcon().save_pretrained(tmp_path)
    model = MambaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    peft = get_peft_model(model, PeftConfig({"lora_X": {"r": 4}, "additional_scan": {"states": 2}}))
    perturb(peft)
    x = torch.randint(0, 97, (2, 9))
    with torch.autocast("cpu", torch.bfloat16):   # fp32 adapters on a bf16 base, as the engine trains
        peft(x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        if ".peft." in n:
            assert p.requires_grad and p.grad is not None and p.grad.any(), n
        else:
            assert not p.requires_grad and p.grad is None, n

"""Bad inputs found by trying them: each is a one-line error naming the file or field and what
was expected (never a traceback deep inside, never a silent wrong result)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import tiny_lm

from mambapeft.cli import DEFAULT_MODEL, main
from mambapeft.io import CheckpointError
from mambapeft.models import MambaForCausalLM, VimConfig


def model_dir(tmp_path, **edits):
    d = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edits)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("edit,message", [
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon must be a number > 0, got '1e-5'"),
    ({"layer_norm_epsilon": -1e-5}, "layer_norm_epsilon must be a number > 0"),
    ({"hidden_size": -4}, "hidden_size must be a positive integer"),
])
def test_bad_config_fields_name_the_file_and_field(tmp_path, edit, message):
    d = model_dir(tmp_path, **edit)
    with pytest.raises(CheckpointError, match=f"config.json: MambaConfig.{message}"):
        MambaForCausalLM.from_pretrained(d)


def test_config_that_is_not_an_object_and_original_ssm_cfg(tmp_path):
    d = model_dir(tmp_path)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: expected a JSON object, got list"):
        MambaForCausalLM.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": 97, "ssm_cfg": 3}))
    with pytest.raises(CheckpointError, match="ssm_cfg must be an object, got 3"):
        MambaForCausalLM.from_pretrained(d)


def test_negative_vim_sizes_and_dtype_strings(tmp_path):
    with pytest.raises(ValueError, match="VimConfig.patch_size must be a positive integer, got -8"):
        VimConfig(img_size=32, patch_size=-8)
    with pytest.raises(ValueError, match="drop_path_rate must be a number in"):
        VimConfig(drop_path_rate=-0.1)
    assert MambaForCausalLM.from_pretrained(DEFAULT_MODEL, dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='float17': expected a torch.dtype"):
        MambaForCausalLM.from_pretrained(DEFAULT_MODEL, dtype="float17")


def test_shard_index_outside_the_model_directory_is_refused(tmp_path):
    d = model_dir(tmp_path)
    (d / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard '../elsewhere.safetensors' is not a file name in"):
        MambaForCausalLM.from_pretrained(d)


IDS = torch.randint(0, 97, (2, 7))


@pytest.mark.parametrize("kwargs,message", [
    ({"input_ids": torch.tensor([[3, 97]])}, r"input_ids hold 3..97; expected token ids in 0..96"),
    ({"input_ids": torch.tensor([[-1, 2]])}, r"expected token ids in 0..96"),
    ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, r"shape \(2, 0\): expected at least one sequence"),
    ({"input_ids": torch.zeros(0, 3, dtype=torch.long)}, r"shape \(0, 3\)"),
    ({"input_ids": torch.tensor([1, 2, 3])}, r"input_ids must be an integer tensor \(batch, length\), got \(3,\)"),
    ({"input_ids": IDS, "labels": IDS.reshape(1, 14)}, r"labels has shape \(1, 14\); expected input_ids' shape"),
    ({"input_ids": IDS, "attention_mask": torch.ones(2, 6)}, r"attention_mask has shape \(2, 6\)"),
    ({"input_ids": IDS, "attention_mask": torch.full((2, 7), 2)}, "attention_mask must hold only 0"),
])
def test_bad_model_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_lm()(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"), ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k must be an integer >= 0"),
    ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0")])
def test_bad_generation_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_lm().generate(IDS, **kwargs)


@pytest.mark.parametrize("argv,message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"), (["--top-p", "0"], "--top-p must be in"),
    (["--top-k", "-1"], "--top-k must be >= 0"), (["--sample", "--temperature", "0"], "--temperature must be > 0"),
    ([""], "an empty prompt"), (["--adapter", __file__], "expected an adapter directory")])
def test_cli_argument_mistakes_are_one_line(argv, message, capsys):
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambapeft: error: ") and message in err and err.count("\n") == 1


def test_cli_model_without_tokenizer_or_with_a_bad_config(tmp_path):
    d = model_dir(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    r = subprocess.run([sys.executable, "-m", "mambapeft.cli", "generate", "--model", str(d)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no usable tokenizer files" in r.stderr and "Traceback" not in r.stderr
    (d / "config.json").write_text(json.dumps({"hidden_size": "big"}))
    r = subprocess.run([sys.executable, "-m", "mambapeft.cli", "generate", "--model", str(d)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "hidden_size must be a positive integer" in r.stderr and "Traceback" not in r.stderr

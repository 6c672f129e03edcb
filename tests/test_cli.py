import subprocess
import sys

from mambapeft.cli import main
from mambapeft.peft import METHODS


def test_methods_lists_every_method_with_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name} " in "\n" + out
    assert "r=8 (int): rank" in out and "dora=False (bool): DoRA" in out and "wd_mult=100.0 (number)" in out
    assert "position='prefix' (prefix|infix|outer): prefix: before conv1d" in out and "states=6 (int)" in out


def test_methods_counts_on_a_model_shape(capsys):
    assert main(["methods", "--model", "falcon-mamba-7b"]) == 0
    out = capsys.readouterr().out
    assert "D=4096, 64 layers, vocab 65024, untied head, model_type falcon_mamba" in out
    assert "\nlora_X                 6,291,456 Partial LoRA" in out                  # 64 * 8 * (4096 + 8192)
    assert "\nfull               7,272,665,088 Baseline" in out
    assert "\nlora_X                50,331,648" in out                               # the r=64 preset
    assert main(["methods", "--model", "falcon-7b"]) == 2
    assert "--model 'falcon-7b': expected one of mamba-130m" in capsys.readouterr().err


def test_generate_runs_the_shipped_model(capsys):
    assert main(["generate", "12+7=", "40+2=", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("=")[0] for line in lines] == ["12+7", "40+2"]


def test_bad_model_path_is_a_clear_error_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mambapeft.cli", "generate", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "no such directory" in r.stderr and "Traceback" not in r.stderr


def test_generate_with_a_saved_adapter(tmp_path, capsys):
    from mambapeft.cli import DEFAULT_MODEL
    from mambapeft.models import MambaForCausalLM
    from mambapeft.peft import PeftConfig, get_peft_model
    peft = get_peft_model(MambaForCausalLM.from_pretrained(DEFAULT_MODEL), PeftConfig({"lora_X": {"r": 4}}))
    peft.save_pretrained(tmp_path)
    assert main(["generate", "12+7=", "--adapter", str(tmp_path), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() == "12+7=19"   # a zero-initialised adapter changes nothing
    (tmp_path / "adapter_config.json").write_text('{"methods": {"lora_q": {}}}')
    assert main(["generate", "--adapter", str(tmp_path)]) == 2
    assert "unknown method 'lora_q'" in capsys.readouterr().err

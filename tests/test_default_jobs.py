"""The two built-in jobs (examples/default_language.yaml, examples/default_vision.yaml) end to end on
random stand-ins of the shipped models, at tiny settings: `model: {}` and `suite: default` find the
shipped models and suites, and each run prints the base model's scores -> the fine-tuned ones, the
trainable parameters and where the adapters and curves are."""
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="mambapeft-test-datasets-"))

import pytest  # noqa: E402

from mambapeft.cli import main  # noqa: E402
from mambapeft.default import shipped, standin  # noqa: E402

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture
def assets(tmp_path, monkeypatch):
    """An assets folder holding tiny stand-ins of mamba-default and vim-default."""
    root = tmp_path / "assets"
    texts = [json.loads(line)["query"] for line in (shipped.LANGUAGE / "count.jsonl").read_text().splitlines()]
    standin.language_model(root / "mamba-default", texts=texts, hidden_size=32, num_hidden_layers=2,
                           vocab_size=300)
    standin.vim(root / "vim-default", hidden_size=32, num_hidden_layers=2)
    monkeypatch.setattr(shipped, "ASSETS", root)
    monkeypatch.setenv("MAMBAPEFT_CACHE", str(tmp_path / "cache"))
    return root


def test_the_language_job_finds_the_shipped_model_and_suite_and_reports_before_and_after(assets, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "lang"
    assert main(["train", str(EXAMPLES / "default_language.yaml"), f"output_dir={out}", "training.progress=false",
                 "training.max_steps=2", "training.batch_size=4", "training.eval_every=0",
                 "task.validation_size=4", "task.eval_limit=3"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    tasks = ["fortune_topic", "wordnet_word", "compare", "count"]
    assert result["base"]["how"] == "adapters disabled"
    for t in tasks:
        assert 0 <= result["base"]["test"][f"{t}/acc"] <= 1 and 0 <= result["test"][f"{t}/acc"] <= 1
    lines = captured.err.splitlines()
    for t in tasks:
        line = f"  {t}/acc" + " " * (len("fortune_topic/acc_norm") - len(f"{t}/acc")) + \
            f"  {result['base']['test'][f'{t}/acc']:.4f} -> {result['test'][f'{t}/acc']:.4f}"
        assert line in lines, (line, lines)
    assert f"trainable parameters: {result['trainable_params']:,d} of {result['total_params']:,d}" in captured.err
    assert (out / "best" / "adapter_model.safetensors").is_file() and (out / "last").is_dir()
    assert f"curves: {out / 'curves.png'}" in lines and (out / "curves.png").is_file()
    # the run read the shipped model (model: {}) and the shipped suite's files (no path in the example)
    from mambapeft.language.task import LanguageTask
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == {} and saved["task"]["suite"] == "default"
    task = LanguageTask(saved["task"])
    assert task.s["data"] == str(shipped.LANGUAGE / "train.json")
    assert task.s["eval_tasks"] == [str(shipped.LANGUAGE / f"{t}.yaml") for t in tasks]
    task.load_model(saved["model"])
    assert task.model_path == str(assets / "mamba-default")
    # merged with the shipped model's tokenizer, not the tiny default's
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "tokenizer.json").read_bytes() == \
        (assets / "mamba-default" / "tokenizer.json").read_bytes()


def test_the_vision_job_runs_on_the_shipped_suite_and_reports_before_and_after(assets, tmp_path, capsys):
    out = tmp_path / "vis"
    assert main(["vtab", str(EXAMPLES / "default_vision.yaml"), "--output", str(out), "--tasks", "count",
                 "training.max_steps=2", "training.progress=false", "training.batch_size=20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 1 and summary["of"] == 7 and set(summary["base"]) == {"count"}
    for name in ("count",):
        r = json.loads((out / name / "result.json").read_text())
        assert r["test_samples"] == 500 and r["train_samples"] == 1000 and r["steps"] == 2
        assert r["group"] == "Structured" and r["num_classes"] == 5
        line = (f"{name:<14} top-1 {r['base_top1']:5.1f} -> {r['top1']:5.1f}  trainable {r['trainable_params']:,d}  "
                f"adapter {out}/{name}/run/last  curves {out}/{name}/run/curves.png")
        assert line in lines, (line, lines)
        assert (out / name / "run" / "last" / "adapter_model.safetensors").is_file()
        assert (out / name / "run" / "curves.png").is_file()
    assert "| Base top-1 |" in (out / "summary.md").read_text()
    assert (tmp_path / "cache" / "default-vision" / "orientation" / "test.txt").is_file()   # written once, all tasks


def test_a_task_outside_the_suite_is_one_line(assets, tmp_path, capsys):
    assert main(["vtab", str(EXAMPLES / "default_vision.yaml"), "--output", str(tmp_path / "x"),
                 "--tasks", "cifar"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mambapeft: error: unknown task(s) of the suite cifar; expected some of clothing, digits, "
                   "noise, texture, count, orientation, position")


def test_eval_takes_the_shipped_model_and_suite_by_name(assets, capsys):
    pytest.importorskip("lm_eval")
    assert main(["eval", "--model", "mamba-default", "--tasks", "default", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in ("fortune_topic", "wordnet_word", "compare", "count")), out

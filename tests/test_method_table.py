"""bench/method_table.py's bookkeeping, on fabricated finished runs (no training): a row's record from
its runs, the table's order and grouping, the findings' logic, the plot, and resuming."""
import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


report = _load("method_table_report")
table = _load("method_table")

N = 100_000   # test items per task: standard errors far below the gaps the tests build


def rec(row, group, accs, params, suite="language", n=N, **extra):
    tasks = dict(zip(["a", "b"], accs))
    return {"suite": suite, "row": row, "group": group, "methods": {}, "tasks": tasks,
            "test_samples": {t: n for t in tasks}, "mean": sum(accs) / len(accs), "trainable_params": params,
            "train_s": 1.0, "wall_s": 2.0, "peak_mem_mb": None, "device": "cpu", **extra}


def records(full=(50, 50), hybrid=(80, 82), n=N):
    return [rec("lora_in_proj", "LoRA", (60, 62), 400, n=n), rec("lora_X", "Partial LoRA", (70, 74), 200, n=n),
            rec("lora_X+dora", "DoRA", (70, 72), 210, n=n), rec("prompt", "Prompt tuning", (40, 40), 20, n=n),
            rec("full", "Baseline", full, 10_000, n=n), rec("all", "Combination", (65, 65), 900, n=n),
            rec("hybrid", "Combination", hybrid, 300, n=n)]


def test_rows_sorted_by_mean_then_fewer_parameters():
    rs = records() + [rec("lora_Z", "Partial LoRA", (72, 72), 150)]   # ties lora_X's mean 72 with fewer params
    order = [r["row"] for r in report.suite_records(rs, "language")]
    assert order == ["hybrid", "lora_Z", "lora_X", "lora_X+dora", "all", "lora_in_proj", "full", "prompt"]


def test_markdown_groups_in_the_papers_order_best_first_within_each():
    rs = records() + [rec("lora_Z", "Partial LoRA", (90, 90), 150)]
    md = "\n".join(report.markdown_suite(rs, "language"))
    headings = [g for g in report.GROUPS if f"**{g}**" in md]
    assert headings == ["LoRA", "Partial LoRA", "DoRA", "Prompt tuning", "Baseline", "Combination"]
    assert md.index("`lora_in_proj`") < md.index("`lora_Z`") < md.index("`lora_X`") < md.index("`lora_X+dora`")
    line = next(x for x in md.splitlines() if "`lora_X`" in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "3"                                   # rank by mean over all rows
    assert cells[2:5] == ["70.0", "74.0", "**72.0** ± 0.1"]  # per task, mean and its standard error
    assert cells[5:7] == ["200", "2.00"]                     # params and % of full


def test_findings_when_the_papers_claims_hold():
    text = "\n".join(report.findings(records(), "language"))
    assert "PEFT beats full fine-tuning (reproduces)" in text
    assert "3 of 4 single methods beat full fine-tuning" in text   # prompt (40) does not
    assert "LoRA_p(X) is among the best (reproduces): `lora_X` ranks 1 of 4" in text
    assert "The hybrid beats every single method (reproduces)" in text and "+9.0 points" in text
    assert "DoRA beats its LoRA in 0 of 1 pairs (`lora_X` 72.0 -> 71.0)" in text
    assert "combining without a search hurts" in text


def test_findings_when_they_do_not():
    rs = records(full=(95, 95), hybrid=(60, 60))
    rs = [r for r in rs if r["row"] != "lora_X+dora"] + [rec(f"m{i}", "LoRA", (74 + i, 74 + i), 10) for i in range(6)]
    text = "\n".join(report.findings(rs, "language"))
    assert "PEFT beats full fine-tuning (does not reproduce)" in text
    assert "0 of 9 single methods beat full fine-tuning" in text
    assert "LoRA_p(X) is among the best (does not reproduce): `lora_X` ranks 7 of 9" in text
    assert "The hybrid beats every single method (does not reproduce)" in text


def test_cost_finding_only_with_gpu_memory():
    assert not any(f.startswith("Cost:") for f in report.findings(records(), "language"))   # CPU: n/a
    rs = records()
    for r, mem in zip(rs, (100, 300, 200, 50, 900, 400, 400)):
        r["peak_mem_mb"] = mem
    cost = [f for f in report.findings(rs, "language") if f.startswith("Cost:")]
    assert cost == ["Cost: full fine-tuning peaks at 900 MiB and trains in 1.0 s; the single methods' median is "
                    "200 MiB (from 50 to 300) and 1.0 s."]


def test_findings_within_noise_are_undecided():
    rs = records(full=(71, 74.5), n=200)   # 0.5 points below the best single method, 200 items per task
    text = "\n".join(report.findings(rs, "language"))
    assert "PEFT beats full fine-tuning (undecided)" in text and "within noise" in text


def test_vision_group_means_and_linear_probing():
    groups = {"a": "natural", "b": "structured"}
    rs = [rec("head", "Baseline", (30, 10), 50, suite="vision", task_groups=groups),
          rec("lora_X", "Partial LoRA", (60, 40), 500, suite="vision", task_groups=groups),
          rec("full", "Baseline", (50, 20), 9000, suite="vision", task_groups=groups)]
    assert report.group_means(rs[1]) == {"natural": 60, "structured": 40}
    md = "\n".join(report.markdown_suite(rs, "vision"))
    assert "natural mean | structured mean | mean" in md
    assert "Linear probing (`head` alone) scores 20.0; 2 of 2 other rows beat it." in report.findings(rs, "vision")


def test_plot_and_outputs(tmp_path):
    rs = records() + [rec("lora_X", "Partial LoRA", (60, 40), 500, suite="vision")]
    report.write_all(rs, tmp_path / "t.jsonl", tmp_path / "t.md", tmp_path / "t.png", "cmd", "abc")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = report.read_records(tmp_path / "t.jsonl")
    assert sorted((r["suite"], r["row"]) for r in back) == sorted((r["suite"], r["row"]) for r in rs)
    md = (tmp_path / "t.md").read_text()
    assert md.index("## Language suite") < md.index("## Vision suite") < md.index("## Findings")


def _table(tmp_path):
    args = Namespace(out=tmp_path / "results", docs=tmp_path / "docs" / "t.md", workers=3, search_workers=1)
    protocols = {"vision": {"epochs": 5}, "language": {"epochs": 3}}
    return table.Table(args, protocols, tmp_path / "work")


def test_a_row_record_from_its_runs_and_resume(tmp_path):
    t = _table(tmp_path)
    t.parts[("vision", "lora_X")] = {"group": "Partial LoRA", "methods": {"lora_X": {}}, "jobs": 2, "done": [],
                                     "order": ["digits", "count"], "run_command": "x"}
    run = lambda task, acc, params, mem: {  # noqa: E731
        "tasks": {task: acc}, "test_samples": {task: 500}, "trainable_params": params, "train_s": 2.0,
        "wall_s": 3.0, "steps": 10, "peak_mem_mb": mem, "device": "gpu", "protocol": {}}
    assert t.finish_job("vision", "lora_X", run("count", 40.0, 1010, 300.0)) is None   # one of two runs
    r = t.finish_job("vision", "lora_X", run("digits", 70.0, 1000, 200.0))
    assert list(r["tasks"]) == ["digits", "count"]          # the suite's order, not the finishing order
    assert r["mean"] == 55.0 and r["trainable_params"] == 1005 and r["peak_mem_mb"] == 300.0
    assert r["train_s"] == 4.0 and r["steps"] == 20 and r["task_groups"] == {"digits": "natural",
                                                                          "count": "structured"}
    assert r["command"].startswith("PYTHONPATH=src python bench/method_table.py")
    again = _table(tmp_path)   # a rerun reads the finished row and skips it, unless its protocol changed
    assert again.done_already("vision", "lora_X", {"lora_X": {}})
    assert not again.done_already("vision", "lora_X", {"lora_X": {"r": 4}})
    assert not again.done_already("language", "lora_X", {"lora_X": {}})


def test_rows_for_each_model():
    lm = {r: (g, m) for r, g, m in table.rows_for("language", dora="lora_X,lora_in_proj")}
    vim = {r: (g, m) for r, g, m in table.rows_for("vision", dora="all")}
    assert "cls" not in lm and "head" not in lm and {"cls", "pos", "head"} <= set(vim)
    assert lm["lora_X+dora"] == ("DoRA", {"lora_X": {"dora": True}}) and "lora_Z+dora" not in lm
    assert lm["full"][0] == "Baseline" and "full" not in lm["all"][1] and "lora_X" in lm["all"][1]
    assert set(vim["all"][1]) == set(vim) - {"all", "full", "head"} - {r for r in vim if r.endswith("+dora")}
    assert {r.removesuffix("+dora") for r in vim if r.endswith("+dora")} == \
        {r for r, (g, _) in vim.items() if g in ("LoRA", "Partial LoRA")}
    assert table.parse_epochs("language=2,vision=7") == {"language": 2.0, "vision": 7.0}
    assert table.parse_epochs("4") == {"language": 4.0, "vision": 4.0}
    with pytest.raises(SystemExit):
        table.rows_for("language", dora="prompt")

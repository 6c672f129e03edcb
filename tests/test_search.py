"""The two-step hybrid search on the tiny model: steps, exact counts over workers, killed workers,
failed trials, the base model's restoration, the test split kept out of the search."""
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

import search_task
from mambapeft.cli import DEFAULT_MODEL, main
from mambapeft.models import MambaForCausalLM
from mambapeft.peft import PeftConfig, get_peft_model
from mambapeft.peft.config import ConfigError
from mambapeft.search import Space, load_search_config, run_search
from mambapeft.search.base import BaseModel
from mambapeft.search.runner import engine_runner
from mambapeft.search.study import with_driver
from mambapeft.training.task import build_task
from mambapeft.training.trainer import train

TESTS = Path(__file__).parent
POSTGRES = os.environ.get("MAMBAPEFT_TEST_POSTGRES_URL")   # .ci/run starts a server and sets it
SPACE = {"step1": {"candidates": {"lora_X": {"r": 4}, "lora_out_proj": {"r": 4}, "D": {},
                                  "additional_scan": {"states": 1}}}}


def write_config(tmp_path, trials=5, storage=None, space=SPACE, task=None, **search):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    cfg = {"model": DEFAULT_MODEL, "task": {"type": "search_toy", "train": 400, "validation": 64, "test": 64,
                                            **(task or {})},
           "training": {"max_steps": 8, "eval_every": 4, "batch_size": 16, "lr": 0.005},
           "output_dir": str(tmp_path / "out"),
           "search": {"trials": trials, "threads": 1, "space": str(tmp_path / "space.yaml"),
                      "pruner": {"type": "median", "startup_trials": 2}, "heartbeat_interval": 1, "grace_period": 3,
                      **search}}
    if storage:
        cfg["search"]["storage"] = storage
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "search.yaml"


@pytest.fixture(autouse=True)
def _one_thread():
    """Trials of a tiny model on a busy 2-core machine: one thread each is many times faster."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def finished(study):
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_two_step_search_writes_a_config_that_trains_and_never_opens_test(tmp_path):
    path = write_config(tmp_path, trials=4)
    cfg = load_search_config(path)
    search_task.SPLITS.clear()
    paths = run_search(cfg, test=False)
    assert set(search_task.SPLITS) == {"validation"}   # the whole search saw validation only
    storage = cfg["search"]["storage"]
    s1 = optuna.load_study(study_name="search.step1", storage=storage)
    s2 = optuna.load_study(study_name="search.step2", storage=storage)
    assert len(finished(s1)) == 4 and len(finished(s2)) == 4
    assert any(t.state == TrialState.PRUNED and t.intermediate_values for t in s1.trials + s2.trials)
    # step 2 starts from step 1's best set by itself: its first trial is that set at its minimal sizes,
    # and (the base model restored between trials) it scores exactly what it scored in step 1
    chosen = Space.load(cfg["search"]["space"]).chosen_set(s1.best_params)
    assert s2.user_attrs["chosen"] == chosen and set(s2.trials[0].user_attrs["methods"]) == set(chosen)
    assert s2.trials[0].value == s1.best_value
    assert all(set(t.user_attrs["methods"]) <= set(chosen) for t in s2.trials)

    # the best configuration is a config `mambapeft train` runs as is, to the best trial's score
    best = yaml.safe_load(paths["best"][0].read_text())
    assert best["methods"] == s2.best_trial.user_attrs["methods"]
    assert main(["train", str(paths["best"][0]), "training.progress=false"]) == 0
    metrics = json.loads((Path(best["output_dir"]) / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["best"] == s2.best_value
    # ... and so does the engine given a freshly loaded base model, as the search runs its trials
    task = build_task(best["task"])
    result = train({**best, "output_dir": str(tmp_path / "again"), "training": {**best["training"], "progress": False}},
                   task=task, model=task.load_model(best["model"]))
    assert result["best"] == s2.best_value
    report = paths["report"].read_text()
    assert "| 3 | " in report and "search.step2.history.png" in report and "Test split" not in report
    assert {p.name for p in (tmp_path / "out").glob("*.png")} >= {"search.step1.history.png", "search.step2.size.png"}

    # rerunning resumes: nothing new to run; the test split is opened once, for the final configuration
    search_task.SPLITS.clear()
    paths = run_search(cfg)
    assert search_task.SPLITS.count("test") == 1
    assert len(optuna.load_study(study_name="search.step2", storage=storage).trials) == len(s2.trials)
    assert "Test split" in paths["report"].read_text() and (tmp_path / "out" / "final.json").is_file()
    search_task.SPLITS.clear()
    run_search(cfg)
    assert search_task.SPLITS == []   # final.json already holds the test scores of this best trial


def test_non_finite_loss_and_out_of_memory_fail_the_trial_and_the_search_goes_on(tmp_path):
    def runner(config, task, model, report):
        if "lora_out_proj" in config["methods"]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return engine_runner(config, task, model, report)

    cfg = load_search_config(write_config(tmp_path, trials=4, task={"nan_if": "D"}, pruner="none", max_failures=3))
    cfg["training"]["max_steps"] = 4
    with pytest.raises(ConfigError, match="3 trials failed"):   # a search whose trials keep failing ends
        run_search(cfg, step="1", runner=runner)
    cfg["search"]["max_failures"] = 100
    cfg["training"]["max_steps"] = 4
    run_search(cfg, step="1", runner=runner)
    study = optuna.load_study(study_name="search.step1", storage=cfg["search"]["storage"])
    assert len(finished(study)) == 4
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and all({"D", "lora_out_proj"} & set(t.user_attrs["methods"]) for t in failed)
    assert {t.user_attrs["failed"].split(":")[0] for t in failed} <= {"TrainingError", "OutOfMemoryError"}
    assert all(not {"D", "lora_out_proj"} & set(t.user_attrs["methods"])
               for t in study.trials if t.state == TrialState.COMPLETE)


def test_base_model_comes_back_exactly_as_loaded():
    model = MambaForCausalLM.from_pretrained(DEFAULT_MODEL)
    base = BaseModel(model)
    ids = torch.randint(1, 15, (2, 9))
    before = model(ids, return_logits=True).logits
    methods = {"lora_X": {"r": 4}, "lora_embed": {"r": 2}, "affix": {"tokens": 1}, "prompt": {"tokens": 2},
               "additional_scan": {"states": 2}, "A": {}, "full": {}, "parallel_adapter": {"r": 4}}
    peft = get_peft_model(model, PeftConfig(methods))
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.1)
    peft(ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(peft(ids, return_logits=True).logits, before)
    restored = base.restore()
    torch.testing.assert_close(restored(ids, return_logits=True).logits, before, rtol=0, atol=0)
    assert not any(p.requires_grad for p in restored.parameters())
    assert set(restored.state_dict()) == set(base.saved)
    get_peft_model(restored, PeftConfig(methods))   # it can be wrapped again


def test_shipped_space_and_user_space_errors(tmp_path):
    lm, vim = Space.load(kind="lm"), Space.load(kind="vim")
    assert "cls" not in lm.candidates and "cls" in vim.candidates and len(vim.candidates) == 19
    assert lm.always == {} and vim.always == {"head": {}}
    trial = optuna.trial.FixedTrial({"drop": "lora_X", "lora_X.r": 8, "lora_X.scale": 0.1, "lora_X.lr_mult": 1.0,
                                     "lora_X.wd_mult": 1.0, "A.lr_mult": 2.0, "A.wd_mult": 50.0,
                                     "head.lr_mult": 3.0, "head.wd_mult": 1.0})
    assert vim.suggest_step2(trial, ["lora_X", "A"]) == {"A": {"lr_mult": 2.0, "wd_mult": 50.0},
                                                          "head": {"lr_mult": 3.0, "wd_mult": 1.0}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("step1: {candidates: {lora_q: {}}}\n")
    with pytest.raises(ConfigError, match="bad.yaml: step1.candidates: unknown method 'lora_q'"):
        Space.load(bad)
    bad.write_text("step2: {common: {r: {low: 8, high: 4}}}\n")
    with pytest.raises(ConfigError, match=r"step2.common.r: low 8 is above high 4"):
        Space.load(bad)


def test_cli_errors_are_one_line(tmp_path, capsys):
    path = write_config(tmp_path)
    text = path.read_text().replace("pruner:", "pruner_x:")
    path.write_text(text)
    assert main(["search", str(path)]) == 2
    assert "search.pruner_x: unknown setting" in capsys.readouterr().err
    path = write_config(tmp_path)
    assert main(["search", str(path), "--storage", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    assert "cannot open it" in capsys.readouterr().err


# ---- several worker processes ---------------------------------------------------------------------
def worker(config, *args, env=None):
    code = ("import sys, search_task; from mambapeft.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", code, "search", str(config), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def shared_storage(tmp_path):
    """The PostgreSQL server of .ci/run; without one, a SQLite file (the same code path, one machine)."""
    return POSTGRES or f"sqlite:///{tmp_path / 'shared.db'}"


def test_two_workers_share_one_study_and_finish_exactly_n_trials(tmp_path):
    storage = shared_storage(tmp_path)
    study = f"two-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, trials=6, storage=storage, pruner={"type": "halving"})
    procs = [worker(config, "--study", study, "--step", "1", *(["--no-test"] if i else [])) for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    s = optuna.load_study(study_name=f"{study}.step1", storage=with_driver(storage))
    done = finished(s)
    assert len(done) == 6   # none lost, none counted twice
    assert len({t.number for t in done}) == 6
    assert len({t.user_attrs["worker"] for t in done}) == 2   # both workers ran trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or "surplus" in t.user_attrs.get("note", "")
               for t in s.trials)


def test_a_killed_worker_started_again_completes_the_study(tmp_path):
    storage = shared_storage(tmp_path)
    study = f"kill-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, trials=3, storage=storage, task={"step_sleep": 0.15}, pruner="none")
    proc = worker(config, "--study", study, "--step", "1", "--no-test")
    deadline = time.time() + 120
    running = []
    while not running and time.time() < deadline:   # kill it in the middle of its first trial
        time.sleep(0.2)
        try:
            s = optuna.load_study(study_name=f"{study}.step1", storage=with_driver(storage))
            running = [t for t in s.trials if t.state == TrialState.RUNNING and "methods" in t.user_attrs]
        except KeyError:
            pass
    assert running, proc.communicate()[0] if proc.poll() is not None else "no trial started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = worker(config, "--study", study, "--step", "1", "--no-test")
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out
    s = optuna.load_study(study_name=f"{study}.step1", storage=with_driver(storage))
    assert len(finished(s)) == 3
    killed = s.trials[running[0].number]
    assert killed.state == TrialState.FAIL   # its heartbeat stopped
    retry = [t for t in s.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params
    assert retry[0].state in (TrialState.COMPLETE, TrialState.PRUNED)   # run again, counted once

"""What one worker holds for a whole search (the tasks, one loaded base model per task) and the
trial objective: wrap, train, score on validation only, restore the base model."""
import copy
import gc
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from ..peft import PeftConfig, get_peft_model
from ..peft.config import ConfigError
from ..training.task import build_task
from .base import BaseModel
from .runner import TRIAL_ERRORS, engine_runner


class TrialFailed(RuntimeError):
    """The trial's training diverged or ran out of memory: recorded as FAIL, the search goes on."""


class Surplus(RuntimeError):
    """Other workers already hold the trials that reach the requested count: this one does not run."""


class ValidationOnly:
    """A task as the search sees it: it has no split but validation (the task contract's KeyError, so
    the engine skips its closing test evaluation)."""

    def __init__(self, task):
        self._task = task

    def __getattr__(self, name):
        return getattr(self._task, name)

    def evaluate(self, model, split):
        if split != "validation":
            raise KeyError(split)
        return self._task.evaluate(model, split)


class Workspace:
    """The tasks of a search and one base model per task, loaded once per worker process."""

    def __init__(self, cfg, runner=engine_runner):
        self.cfg, self.runner = cfg, runner
        self.tasks = [build_task(section, f"{cfg['source']}: tasks[{i}]") for i, section in enumerate(cfg["tasks"])]
        better = {t.greater_is_better for t in self.tasks}
        if len(better) > 1:
            raise ConfigError(f"{cfg['source']}: tasks: their metrics do not agree on a direction "
                              f"({', '.join(t.metric for t in self.tasks)}); the search averages them")
        self.greater_is_better = better.pop()
        self.bases = [BaseModel(t.load_model(cfg["model"])) for t in self.tasks]

    @property
    def direction(self):
        return "maximize" if self.greater_is_better else "minimize"

    def trainable(self, methods):
        """Trainable parameter count of `methods` on the first task's model."""
        base = self.bases[0]
        try:
            return get_peft_model(base.model, PeftConfig.from_dict({"methods": methods})).num_parameters()[0]
        finally:
            base.restore()

    def validation_score(self, trial, methods):
        """Mean validation score over the tasks. Intermediate scores go to the pruner at one global
        step counter: every trial runs the tasks in the same order with the same schedule, so the
        pruner compares like with like."""
        step, scores = 0, []

        def report(value):
            nonlocal step
            trial.report(float(value), step)
            step += 1
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at intermediate step {step - 1}")

        for i, (task, base) in enumerate(zip(self.tasks, self.bases)):
            try:
                with tempfile.TemporaryDirectory(prefix="mambapeft-trial-") as run_dir:
                    out = self.runner(self.train_config(i, methods, run_dir), ValidationOnly(task), base.model, report)
            except TRIAL_ERRORS as e:
                raise TrialFailed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            finally:
                base.restore()
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            if out["validation"] is None:
                raise ConfigError(f"{self.cfg['source']}: tasks[{i}] gave no validation score; the search "
                                  "needs a validation split")
            scores.append(out["validation"])
        trial.set_user_attr("scores", scores)
        return sum(scores) / len(scores)

    def train_config(self, i, methods, run_dir, final=False, quiet=True):
        """The training config of task i with `methods`: what a trial runs and best.yaml holds."""
        return train_config(self.cfg, i, methods, run_dir, final, quiet)

    def test_scores(self, methods, out_dir):
        """The final configuration trained once per task (search.final_task merged into the task) and
        scored on the test split, the only time the search opens it; runs kept in OUT/final/task{i}."""
        results = []
        for i, base in enumerate(self.bases):
            config = self.train_config(i, methods, Path(out_dir) / "final" / f"task{i}", final=True)
            shutil.rmtree(config["output_dir"], ignore_errors=True)   # an interrupted earlier attempt
            task = build_task(config["task"], f"{self.cfg['source']}: tasks[{i}] with search.final_task")
            try:
                out = self.runner(config, task, base.model, lambda value: None)
            finally:
                base.restore()
            if out["test"] is None:
                raise ConfigError(f"{self.cfg['source']}: tasks[{i}] has no test split to score the final "
                                  "configuration on")
            results.append({"task": config["task"], "metric": task.metric, "test": out["test"],
                            "run": config["output_dir"]})
        return results


def train_config(cfg, i, methods, run_dir, final=False, quiet=True):
    section = {**cfg["tasks"][i], **(cfg["search"]["final_task"] if final else {})}
    training = {"progress": False, **cfg["training"]} if quiet else dict(cfg["training"])
    return {"model": copy.deepcopy(cfg["model"]), "methods": copy.deepcopy(methods), "task": copy.deepcopy(section),
            "training": training, "output_dir": str(run_dir)}


def make_objective(workspace, suggest, n_trials):
    """The Optuna objective of one step; `suggest(trial)` gives the trial's {method: settings}."""

    def objective(trial):
        _check_not_surplus(trial, n_trials)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        methods = suggest(trial)
        trial.set_user_attr("methods", methods)
        if not methods:   # TPE learns from a pruned trial that this corner is worthless
            trial.set_user_attr("note", "no method chosen")
            raise optuna.TrialPruned("no method chosen")
        trial.set_user_attr("trainable", workspace.trainable(methods))
        try:
            value = workspace.validation_score(trial, methods)
            if not math.isfinite(value):
                raise TrialFailed(f"validation score {value}")
        except TrialFailed as e:
            trial.set_user_attr("failed", str(e))   # for the report, and run_trials' limit on failures
            raise
        return value

    return objective


def _check_not_surplus(trial, n_trials):
    """Exactly n_trials finished (COMPLETE or PRUNED) trials, whatever the number of workers: a trial
    runs only if the finished ones plus the running ones numbered before it leave room for it."""
    study = trial.study
    ahead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                  TrialState.RUNNING))
             if t.state != TrialState.RUNNING or t.number < trial.number]
    if len(ahead) >= n_trials:
        trial.set_user_attr("note", "surplus: not run, the requested count was already reached")
        raise Surplus(f"trial {trial.number} not run: {n_trials} trials are finished or running")

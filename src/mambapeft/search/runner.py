"""The objective runner, the one place the search meets the training engine: train one PEFT
configuration on an already-loaded base model and return its scores.

    runner(config, task, model, report) -> {"validation": score, "test": score or None}

`config` is a complete training config (model, methods, task, training, output_dir); `report(value)`
receives every intermediate validation score and may raise optuna.TrialPruned, which ends the run."""
import torch

from ..training.trainer import TrainingError, train

# What ends one trial as failed while the search goes on: a non-finite loss, memory exhausted.
TRIAL_ERRORS = (TrainingError, torch.OutOfMemoryError, MemoryError)


def engine_runner(config, task, model, report):
    metric = task.metric
    result = train(config, task=task, model=model, callback=lambda step, metrics: report(metrics[metric]))
    # the engine keeps the adapter with the best validation score (and tests that one): so is the trial scored
    best = result["best"] if result["best"] is not None else (result["validation"] or {}).get(metric)
    return {"validation": best, "test": (result["test"] or {}).get(metric)}

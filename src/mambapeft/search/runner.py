"""The objective runner: train one PEFT configuration on an already-loaded base model and score it.

    runner(task, base_model, methods, training, report, split="validation") -> {split: score, ...}

`report(value)` receives every intermediate validation score (it may raise optuna.TrialPruned);
the return value holds the final score on `split`. This is the one place the search meets the
training engine."""
import math
import random

import torch

from ..peft import PeftConfig, get_peft_model


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the trial fails, the search goes on."""


# What ends one trial as failed while the search goes on: a diverged loss, memory exhausted.
TRIAL_ERRORS = (NonFiniteLoss, torch.OutOfMemoryError, MemoryError)


def train_and_score(task, base_model, methods, training, report, split="validation"):
    """A short AdamW loop over the task contract (training/task.py): max_steps steps of batch_size
    items, a validation score every eval_every steps to `report`, then one score on `split`."""
    t = {"lr": 1e-3, "weight_decay": 0.0, "batch_size": 16, "max_steps": 20, "eval_every": 0, "seed": 0,
         "grad_clip": 1.0, **training}
    torch.manual_seed(t["seed"])
    model = get_peft_model(base_model, PeftConfig.from_dict({"methods": methods}, "methods"))
    optimizer = torch.optim.AdamW(model.param_groups(t["lr"], t["weight_decay"]))
    items, order = task.train_set(), random.Random(t["seed"])
    model.train()
    for step in range(1, t["max_steps"] + 1):
        batch = task.collate([items[order.randrange(len(items))] for _ in range(t["batch_size"])])
        total, count = task.loss(model, batch)
        loss = total / count
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss {loss.item()} at step {step}")
        loss.backward()
        if t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], t["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if t["eval_every"] and step % t["eval_every"] == 0 and step < t["max_steps"]:
            report(_score(task, model, "validation"))
    out = {split: _score(task, model, split)}
    model.train(base_model.training)
    return out


def _score(task, model, split):
    model.eval()
    with torch.no_grad():
        value = float(task.evaluate(model, split)[task.metric])
    model.train()
    if not math.isfinite(value):
        raise NonFiniteLoss(f"{split} {task.metric} is {value}")
    return value

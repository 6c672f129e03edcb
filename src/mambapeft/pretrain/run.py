"""What both pretraining jobs share: an output folder that must be new, the engine run in OUT/run
(only its light files kept), and pretrain.json."""
import shutil
import statistics
import time
from pathlib import Path

from ..cli import UsageError
from ..io import write_json
from ..training import logs

RUN = "run"
HEAVY = ("checkpoints", "best", "last", "tensorboard")   # full copies of the weights, optimizer state, events


def check_out_dir(out_dir):
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: the output folder must be new or empty")
    return out


def engine_config(out_dir, model, task, steps, batch_size, lr, seed, warmup, eval_every, weight_decay, device):
    """The engine's config: every base weight trains (method full), AdamW with a warmup and a cosine
    decay to a tenth of lr, validation every `eval_every` steps (the best validation weights are the
    ones kept), one checkpoint at the end (dropped afterwards: a from-scratch run is restarted, not
    resumed)."""
    return {"model": model, "methods": "full", "task": task, "output_dir": str(Path(out_dir) / RUN),
            "training": {"lr": lr, "batch_size": batch_size, "max_steps": steps, "seed": seed,
                         "warmup_steps": min(warmup, steps // 2), "schedule": "cosine", "min_lr_ratio": 0.1,
                         "weight_decay": weight_decay, "grad_clip": 1.0, "eval_every": min(eval_every, steps),
                         "save_every": steps, "keep_checkpoints": 1, "log_every": 10, "device": device}}


def train(config, task, model):
    """Run the engine; returns (result, seconds, median step seconds). The model ends holding the
    weights of the best validation, as the engine leaves them."""
    from ..training.trainer import train as engine_train
    start = time.perf_counter()
    result = engine_train(config, task=task, model=model)
    wall = time.perf_counter() - start
    run_dir = Path(config["output_dir"])
    for name in HEAVY:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    steps = [r["step_s"] for r in logs.read(run_dir / logs.LOG) if "step_s" in r]
    return result, wall, statistics.median(steps) if steps else None


def write_summary(out_dir, summary):
    write_json(Path(out_dir) / "pretrain.json", summary)


def device_name(device):
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"

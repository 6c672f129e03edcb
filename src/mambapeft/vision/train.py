"""A minimal training loop over the task contract, used by `mambapeft vtab` until the engine
(issue 8) is in main: AdamW over the PEFT param groups, per-step linear warmup then cosine decay to
a floor, gradient clipping, bf16 autocast on CUDA. No checkpoints or resume: a VTAB-1k task is one
short run, and a rerun of `mambapeft vtab` redoes only the tasks without a result."""
import math

import torch

# the engine's names for these settings, so configs stay valid when it replaces this loop
TRAINING_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "schedule", "min_lr_ratio", "grad_clip",
                 "seed", "num_workers")


def lr_factor(step, total, warmup, floor):
    """Multiplier of the base learning rate at optimizer step `step` (0-based): (step+1)/warmup during
    warmup, then half a cosine from 1 down to `floor` (min_lr / lr) at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(peft_model, task, training: dict, device, log=print):
    """Train `peft_model` (a PeftModel) on `task.train_set()`; returns the per-epoch mean losses."""
    t = training
    generator = torch.Generator().manual_seed(t["seed"])
    loader = torch.utils.data.DataLoader(task.train_set(), batch_size=t["batch_size"], shuffle=True,
                                         generator=generator, num_workers=t["num_workers"],
                                         collate_fn=task.collate, persistent_workers=t["num_workers"] > 0)
    steps = len(loader)
    total = t["epochs"] * steps
    warmup = int(t["warmup_ratio"] * total)
    groups = peft_model.param_groups(t["lr"], t["weight_decay"])
    optimizer = torch.optim.AdamW(groups, lr=t["lr"])
    base = [g["lr"] for g in optimizer.param_groups]
    params = [p for g in groups for p in g["params"]]
    floor = t["min_lr_ratio"]
    peft_model.train()
    history, step = [], 0
    for epoch in range(t["epochs"]):
        loss_sum, count = 0.0, 0
        for batch in loader:
            for g, lr in zip(optimizer.param_groups, base):
                g["lr"] = lr * lr_factor(step, total, warmup, floor)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, n = task.loss(peft_model, batch)
            (loss / n).backward()
            if t["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, count, step = loss_sum + float(loss.detach()), count + int(n), step + 1
        history.append(loss_sum / count)
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}")
        log(f"epoch {epoch + 1}/{t['epochs']}: loss {history[-1]:.4f}")
    return history

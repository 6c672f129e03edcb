"""Learning-rate schedule: linear warmup from 0, then linear or cosine decay to a floor."""
import math


def lr_factor(step, total, warmup=0, kind="cosine", floor=0.0):
    """The multiplier of the peak lr for optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)   # never 0: the first step already moves the adapter
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay

"""Task type "toy": two-digit sums written backwards ("12+7=91") on the shipped tiny character
Mamba, which knows the forward sums (examples/make_tiny_model.py). Small, fast and learnable in a
few dozen steps; the tests and the search's smoke runs train on it.

    task: {type: toy, op: reverse, train: 2000, validation: 200, test: 200, seed: 0, metric: loss}
"""
import random

import torch

from ..peft.config import ConfigError
from .task import register_task

CHARS = ["<|endoftext|>", *"0123456789+=\n "]   # the tiny model's vocabulary (id = index)
EOS = 0
SETTINGS = {"op": "reverse", "train": 2000, "validation": 200, "test": 200, "seed": 0, "metric": "loss",
            "eval_batch_size": 256}


def encode(text):
    return [CHARS.index(c) for c in text]


def answer(a, b, op):
    return str(a + b)[::-1] if op == "reverse" else str(a + b)


class ToyTask:
    unit = "tokens"

    def __init__(self, section, source="task"):
        unknown = sorted(set(section) - set(SETTINGS) - {"type"})
        if unknown:
            raise ConfigError(f"{source}.{unknown[0]}: unknown setting; expected one of {', '.join(SETTINGS)}")
        s = {**SETTINGS, **section}
        if s["op"] not in ("reverse", "add"):
            raise ConfigError(f"{source}.op: expected reverse or add, got {s['op']!r}")
        if s["metric"] not in ("loss", "acc"):
            raise ConfigError(f"{source}.metric: expected loss or acc, got {s['metric']!r}")
        sizes = [s[k] for k in ("train", "validation", "test")]
        if not all(isinstance(n, int) and n >= 0 for n in sizes) or sum(sizes) > 10000:
            raise ConfigError(f"{source}: train, validation, test: expected counts >= 0 summing to at most 10000")
        self.metric, self.greater_is_better = s["metric"], s["metric"] == "acc"
        self.eval_batch_size = s["eval_batch_size"]
        pairs = [(a, b) for a in range(100) for b in range(100)]
        random.Random(s["seed"]).shuffle(pairs)   # disjoint splits, the same for every run with this seed
        items = [(encode(f"{a}+{b}="), encode(answer(a, b, s["op"])) + [EOS]) for a, b in pairs]
        n_train, n_val, n_test = sizes
        self.splits = {"train": items[:n_train], "validation": items[n_train:n_train + n_val],
                       "test": items[n_train + n_val:n_train + n_val + n_test]}

    def load_model(self, model_section):
        from ..cli import DEFAULT_MODEL
        from ..models import MambaForCausalLM
        return MambaForCausalLM.from_pretrained(model_section.get("path") or DEFAULT_MODEL)

    def train_set(self):
        return self.splits["train"]

    def collate(self, items):
        """Right-padded ids; labels only on the answer and its end-of-text token."""
        T = max(len(p) + len(a) for p, a in items)
        ids = torch.full((len(items), T), EOS, dtype=torch.long)
        labels = torch.full((len(items), T), -100, dtype=torch.long)
        for i, (p, a) in enumerate(items):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
        return {"input_ids": ids, "labels": labels}

    def loss(self, model, batch):
        count = (batch["labels"][:, 1:] != -100).sum()
        return model(batch["input_ids"], labels=batch["labels"]).loss.float() * count, count

    def evaluate(self, model, split):
        if not self.splits.get(split):
            raise KeyError(split)
        device = next(model.parameters()).device
        total, count, right, n = 0.0, 0, 0, 0
        data = self.splits[split]
        for i in range(0, len(data), self.eval_batch_size):
            batch = {k: v.to(device) for k, v in self.collate(data[i:i + self.eval_batch_size]).items()}
            logits = model(batch["input_ids"], return_logits=True).logits.float()[:, :-1]
            target = batch["labels"][:, 1:]
            mask = target != -100
            total += torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
            count += int(mask.sum())
            right += int(((logits.argmax(-1) == target) | ~mask).all(1).sum())   # every answer token right
            n += len(target)
        return {"loss": total / count, "acc": right / n}


@register_task("toy")
def _toy(section, source):
    return ToyTask(section, source)

"""A small real task for the search tests: two-digit sums written backwards ("12+7=91") on the
shipped tiny character Mamba (which knows the forward sums). It records every split it evaluates,
in SPLITS and, when MAMBAPEFT_TEST_SPLITS names a file, one line per evaluation there.

Task settings: {type: search_toy, train: 400, validation: 64, test: 64, nan_if: <method name>} —
`nan_if` makes the loss NaN whenever that method is attached (to test failed trials); `step_sleep`
seconds per training loss make trials slow enough to kill one midway."""
import os
import random
import time

import torch

from mambapeft.training.task import register_task

CHARS = ["<|endoftext|>", *"0123456789+=\n "]
SPLITS = []


def _encode(text):
    return [CHARS.index(c) for c in text]


class SumsBackwards:
    metric, greater_is_better, unit = "loss", False, "tokens"

    def __init__(self, section, source="task"):
        pairs = [(a, b) for a in range(100) for b in range(100)]
        random.Random(section.get("seed", 0)).shuffle(pairs)
        items = [(_encode(f"{a}+{b}="), _encode(str(a + b)[::-1]) + [0]) for a, b in pairs]
        n = [section.get(k, d) for k, d in (("train", 400), ("validation", 64), ("test", 64))]
        self.splits = {"train": items[:n[0]], "validation": items[n[0]:n[0] + n[1]],
                       "test": items[n[0] + n[1]:sum(n)]}
        self.nan_if, self.step_sleep = section.get("nan_if"), section.get("step_sleep", 0)

    def load_model(self, model_section):
        from mambapeft.cli import DEFAULT_MODEL
        from mambapeft.models import MambaForCausalLM
        return MambaForCausalLM.from_pretrained(model_section.get("path") or DEFAULT_MODEL)

    def train_set(self):
        return self.splits["train"]

    def collate(self, items):
        T = max(len(p) + len(a) for p, a in items)
        ids = torch.zeros(len(items), T, dtype=torch.long)
        labels = torch.full((len(items), T), -100, dtype=torch.long)
        for i, (p, a) in enumerate(items):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
        return {"input_ids": ids, "labels": labels}

    def loss(self, model, batch):
        count = (batch["labels"][:, 1:] != -100).sum()
        loss = model(batch["input_ids"], labels=batch["labels"]).loss * count
        time.sleep(self.step_sleep if model.training else 0)
        if self.nan_if and self.nan_if in model.peft_config.methods:
            loss = loss * float("nan")
        return loss, count

    def evaluate(self, model, split):
        SPLITS.append(split)
        if os.environ.get("MAMBAPEFT_TEST_SPLITS"):
            with open(os.environ["MAMBAPEFT_TEST_SPLITS"], "a") as f:
                f.write(split + "\n")
        batch = self.collate(self.splits[split])
        total, count = self.loss(model, batch)
        return {"loss": float(total / count)}


register_task("search_toy")(SumsBackwards)

"""The engine's toy task (two-digit sums backwards on the shipped tiny Mamba) as the search tests
need it: it records every split it evaluates, in SPLITS and, when MAMBAPEFT_TEST_SPLITS names a
file, one line per evaluation there (worker processes).

Extra settings: `nan_if: METHOD` makes the loss NaN whenever that method is attached (failed
trials); `step_sleep: SECONDS` per training batch makes trials slow enough to kill one midway."""
import os
import time

from mambapeft.training.task import register_task
from mambapeft.training.toy import ToyTask

SPLITS = []


class RecordingToy(ToyTask):
    def __init__(self, section, source="task"):
        section = dict(section)
        self.nan_if, self.step_sleep = section.pop("nan_if", None), section.pop("step_sleep", 0)
        super().__init__({**section, "type": "toy"}, source)

    def loss(self, model, batch):
        time.sleep(self.step_sleep)
        total, count = super().loss(model, batch)
        if self.nan_if and self.nan_if in model.peft_config.methods:
            total = total * float("nan")
        return total, count

    def evaluate(self, model, split):
        SPLITS.append(split)
        if os.environ.get("MAMBAPEFT_TEST_SPLITS"):
            with open(os.environ["MAMBAPEFT_TEST_SPLITS"], "a") as f:
                f.write(split + "\n")
        return super().evaluate(model, split)


register_task("search_toy")(RecordingToy)

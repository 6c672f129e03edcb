"""The contract between the engine and a protocol (language, vision, the toy task of the tests).

The engine knows no text and no images. It owns the order of training items (a seeded
permutation per epoch, split over processes), so a resumed run, or a run over several
processes, sees exactly the items an uninterrupted single-process run would see."""
from typing import Any, Callable, Protocol, Sequence

import torch


class Task(Protocol):
    metric: str               # the validation metric that picks the best adapter ("acc", "loss", ...)
    greater_is_better: bool   # True for accuracy, False for a loss
    unit: str                 # what loss() counts, for throughput: "tokens" or "samples"

    def load_model(self, model_section: dict) -> torch.nn.Module:
        """The base model (not yet wrapped) that this task trains, from the config's `model` section:
        a language model for text, a Vim with as many classes as the data has for images."""

    def train_set(self) -> Sequence:
        """The training items: len() and [i]. Items must pickle (DataLoader worker processes)."""

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        """One batch (CPU tensors) from a list of items."""

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | int]:
        """(sum of the per-unit losses, number of units summed). The engine divides by the total
        count over micro-batches and processes, so the gradient does not depend on the split."""

    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        """Metrics on "validation" or "test" (the model in eval mode, under no_grad); the result
        holds `metric`. A task without that split raises KeyError naming it."""


TASKS: dict[str, Callable[[dict, str], Task]] = {}
# Built-in task types and the module that registers each, imported only when a config names it.
BUILTIN = {"language": "mambapeft.language.task", "vision": "mambapeft.vision.task", "toy": "mambapeft.training.toy"}


def register_task(name: str):
    """Register `factory(section, source) -> Task` under `task.type: name` of a training config;
    `section` is the config's `task` mapping and `source` names it in error messages."""
    def deco(factory):
        TASKS[name] = factory
        return factory
    return deco


def build_task(section: Any, source: str = "task") -> Task:
    import importlib
    from ..peft.config import ConfigError
    if isinstance(section, dict) and section.get("type") in BUILTIN and section["type"] not in TASKS:
        importlib.import_module(BUILTIN[section["type"]])
    if not isinstance(section, dict) or "type" not in section:
        raise ConfigError(f"{source}: expected a mapping with a 'type' ({', '.join(sorted(set(TASKS) | set(BUILTIN)))})")
    if section["type"] not in TASKS:
        raise ConfigError(f"{source}.type: unknown task type {section['type']!r}; expected one of "
                          f"{', '.join(sorted(set(TASKS) | set(BUILTIN)))}")
    return TASKS[section["type"]](section, source)

"""Baselines: full fine-tuning and the classification head. They attach no module; they train
base tensors in place (so they cannot be disabled, unloaded or share a base with another adapter)."""
from dataclasses import dataclass

from .registry import register
from .settings import Common


@dataclass
class PlainSettings(Common):
    pass


def _head(model):
    return (model.head if hasattr(model, "patch_embed") else model.lm_head).parameters()


register("full", PlainSettings, "Baseline", "full fine-tuning: every base weight trains",
         base_params=lambda model: model.parameters())
register("head", PlainSettings, "Baseline", "the classification head trains (alone: linear probing)",
         models=("vim",), base_params=_head)

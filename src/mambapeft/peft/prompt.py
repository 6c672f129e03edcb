"""Prompt tuning: n learned tokens in the residual stream, kept through all layers.

Without projection the tokens are parameters; with projection they come from
Embedding(n, D) -> Linear(D, D) -> Tanh -> Linear(D, D). `collapse()` turns a trained
projection into plain tokens."""
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models.adapter import ModelAdapter
from .registry import register
from .settings import Common, at_least_one, setting


@dataclass
class PromptSettings(Common):
    tokens: int = setting(8, "number of prompt tokens", at_least_one)
    projection: bool = setting(False, "reparameterise: Embedding -> Linear -> Tanh -> Linear")
    hidden: int | None = setting(None, "projection width (default: the model width D)", at_least_one)


class Reparam(nn.Module):
    """Embedding(n, width) -> Linear(width, hidden) -> Tanh -> Linear(hidden, out)."""

    def __init__(self, n, width, hidden, out):
        super().__init__()
        self.embedding = nn.Embedding(n, width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self, rows=None):
        h = self.mlp[1](self.mlp[0](self.embedding.weight))
        last = self.mlp[2]
        if rows is None:
            return last(h)
        return nn.functional.linear(h, last.weight[rows], last.bias[rows])


class PromptTuning(ModelAdapter):
    mergeable = False

    def __init__(self, d_model, tokens, projection=False, hidden=None, init_std=0.02):
        super().__init__()
        if projection:
            self.proj = Reparam(tokens, d_model, hidden or d_model, d_model)
            self.tokens = None
        else:
            self.proj = None
            self.tokens = nn.Parameter(torch.randn(tokens, d_model) * init_std)

    def prompt(self):
        return self.tokens if self.proj is None else self.proj()

    @torch.no_grad()
    def collapse(self):
        if self.proj is not None:
            self.tokens = nn.Parameter(self.proj().detach().clone())
            self.proj = None


def _attach(site, name, s):
    m0 = site.mixers[0]
    site.put(site.backbone.peft, name, PromptTuning(m0.d_model, s.tokens, s.projection, s.hidden), m0.in_proj.weight)


register("prompt", PromptSettings, "Prompt tuning", "learned tokens in the residual stream", _attach)

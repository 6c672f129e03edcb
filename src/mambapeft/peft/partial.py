"""Partial tuning "v2": a zero-initialised additive delta on A_log, D, the conv weight, the dt
bias, or Vim's CLS token and position embedding. Weight decay on the delta pulls the tensor back
toward its pretrained value instead of toward zero."""
import torch
import torch.nn as nn

from ..models.adapter import ModelAdapter
from ..models.mixer import MixerAdapter

MIXER_TARGETS = {"A": "A_log", "D": "D", "conv1d": "conv_w", "bias": "dt_b"}


class MixerDelta(MixerAdapter):
    order = 0

    def __init__(self, mixer, target, direction=0):
        super().__init__()
        self.field, self.direction = MIXER_TARGETS[target], direction
        like = getattr(mixer.compose(adapters=[]).dirs[direction], self.field)
        self.delta = nn.Parameter(torch.zeros(like.shape, dtype=torch.float32))

    def compose(self, c, mixer, merge=False):
        s = c.dirs[self.direction]
        base = getattr(s, self.field)
        setattr(s, self.field, base + self.delta.to(base.dtype))


class ParamDelta(ModelAdapter):
    mergeable = True

    def __init__(self, name, like):
        super().__init__()
        self.name = name
        self.delta = nn.Parameter(torch.zeros_like(like, dtype=torch.float32))

    def adapt_param(self, name, tensor):
        return tensor + self.delta.to(tensor.dtype) if name == self.name else tensor

    def merge_into(self, model):
        getattr(model, self.name).add_(self.delta.to(getattr(model, self.name).dtype))

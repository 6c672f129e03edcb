"""Partial tuning "v2": a zero-initialised additive delta on A_log, D, the conv weight, the dt
bias, or Vim's CLS token and position embedding. Weight decay on the delta pulls the tensor back
toward its pretrained value instead of toward zero."""
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models.adapter import ModelAdapter
from ..models.mixer import MixerAdapter
from .registry import register
from .settings import Common, non_negative, setting


@dataclass
class PartialSettings(Common):
    wd_mult: float = setting(10.0, "weight decay multiplier; decay pulls the tensor toward its pretrained "
                                   "value (the reference decays A, D and conv1d deltas 10x, the dt bias 100x)",
                             non_negative)


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


def _attach_mixer_delta(site, name, s):
    site.per_direction(name, lambda m, d: MixerDelta(m, name, d))


def _attach_model_delta(pname):
    def attach(site, name, s):
        site.put(site.backbone.peft, name, ParamDelta(pname, getattr(site.model, pname)), getattr(site.model, pname))
    return attach


register("A", PartialSettings, "Partial tuning", "additive delta on A_log", _attach_mixer_delta)
register("D", PartialSettings, "Partial tuning", "additive delta on D", _attach_mixer_delta)
register("conv1d", PartialSettings, "Partial tuning", "additive delta on the conv1d weight", _attach_mixer_delta)
register("bias", PartialSettings, "Partial tuning", "additive delta on the dt_proj bias", _attach_mixer_delta,
         defaults={"wd_mult": 100.0})
register("cls", PartialSettings, "Partial tuning", "additive delta on the CLS token", _attach_model_delta("cls_token"),
         models=("vim",), defaults={"wd_mult": 1.0})
register("pos", PartialSettings, "Partial tuning", "additive delta on the position embedding",
         _attach_model_delta("pos_embed"), models=("vim",), defaults={"wd_mult": 1.0})

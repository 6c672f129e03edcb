"""Parallel adapter: a bottleneck beside out_proj, reading the gated scan output g."""
from dataclasses import dataclass

import torch.nn as nn

from ..models.mixer import MixerAdapter
from .registry import register
from .settings import Common, at_least_one, probability, setting


@dataclass
class ParallelAdapterSettings(Common):
    r: int = setting(32, "bottleneck width", at_least_one)
    scale: float = setting(0.1, "scale of the adapter's output")
    dropout: float = setting(0.1, "dropout after the ReLU", probability)


class ParallelAdapter(MixerAdapter):
    """out += s * U(Dropout(ReLU(V g))), V: E -> r, U: r -> D (zeros), beside out_proj."""
    mergeable = False

    def __init__(self, mixer, r, scale, dropout):
        super().__init__()
        self.down = nn.Linear(mixer.d_inner, r, bias=False)
        self.up = nn.Linear(r, mixer.d_model, bias=False)
        nn.init.zeros_(self.up.weight)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def adapt_out(self, g, out):
        return self.finish(self.down(g.to(self.down.weight.dtype)), out)

    def finish(self, p, out):
        """From the down projection p = V g on."""
        return out + (self.up(self.dropout(p.relu().to(self.up.weight.dtype))) * self.scale).to(out.dtype)

    def out_proj_taps(self):
        return [(self.down.weight, self.finish)]


register("parallel_adapter", ParallelAdapterSettings, "Parallel adapter", "bottleneck adapter beside out_proj",
         lambda site, name, s: site.per_mixer(name, lambda m: {name: ParallelAdapter(m, s.r, s.scale, s.dropout)}))

"""Affix tuning: per layer, n learned tokens prefixed to the mixer's sequence before conv1d.

They pass through conv1d, write into the SSM state and their outputs are dropped, so the real
sequence starts from a learned state. The z half of a token only gates its own dropped output
(zero gradient), so by default only the x half (width E) is stored; `store_z` keeps the paper's
2E layout. Position "infix" spreads the tokens between n+1 equal chunks of the sequence (of the
prefill, when decoding); "outer" puts width-D prefix tokens before in_proj instead. One shared `AffixTokens`
module holds every layer's tokens (the projection spans all layers); each mixer gets a small
`AffixLayer` view that reads its slice.
"""
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from ..models.adapter import ModelAdapter
from ..models.mixer import MixerAdapter
from .prompt import Reparam
from .registry import register
from .settings import Common, at_least_one, setting


@dataclass
class AffixSettings(Common):
    tokens: int = setting(3, "affix tokens per layer", at_least_one)
    projection: bool = setting(False, "reparameterise: Embedding -> Linear -> Tanh -> Linear over all layers")
    hidden: int | None = setting(None, "projection width (default: the token width, as the reference)",
                                 at_least_one)
    position: Literal["prefix", "infix", "outer"] = setting(
        "prefix", "prefix: before conv1d; infix: between equal chunks of the sequence; outer: width-D tokens "
                  "before in_proj")
    dual: bool = setting(True, "Vim: each scan direction gets its own tokens")
    store_z: bool = setting(False, "keep the paper's 2E layout (the z half never gets gradient)")


class AffixTokens(ModelAdapter):
    """All layers' tokens: width = E (x half), 2E (store_z) or D (outer); npl tokens sets per layer."""
    mergeable = False

    def __init__(self, n, layers, per_layer, width, projection=False, hidden=None, init_std=1.0):
        super().__init__()
        self.n, self.layers, self.per_layer, self.width = n, layers, per_layer, width
        total = layers * per_layer * width
        if projection:
            self.proj = Reparam(n, width, hidden or width, total)
            self.tokens = None
        else:
            self.proj = None
            self.tokens = nn.Parameter(torch.randn(n, total) * init_std)  # the reference's N(0, 1)

    def layer_tokens(self, layer, k):
        """(n, width) tokens of set k (direction) in `layer`."""
        start = (layer * self.per_layer + k) * self.width
        if self.proj is None:
            return self.tokens[:, start:start + self.width]
        return self.proj(slice(start, start + self.width))

    @torch.no_grad()
    def collapse(self):
        if self.proj is not None:
            self.tokens = nn.Parameter(self.proj().detach().clone())
            self.proj = None


class AffixLayer(MixerAdapter):
    order = 30
    mergeable = False

    def __init__(self, tokens: AffixTokens, layer, position, dual, store_z):
        super().__init__()
        self._tokens = [tokens]  # a plain list: the parameters belong to the model-level module
        self.layer, self.position, self.dual, self.store_z = layer, position, dual, store_z

    def reads_padding(self):   # infix tokens go between chunks of each row's real length
        return self.position == "infix"

    def compose(self, c, mixer, merge=False):
        tokens = self._tokens[0]
        if self.position == "outer":
            c.affix_h = tokens.layer_tokens(self.layer, 0)
            return
        E = mixer.d_inner
        for d in range(len(c.dirs) if self.dual else 1):
            t = tokens.layer_tokens(self.layer, d)
            c.dirs[d].affix = t[:, :E].t()
            if self.store_z:
                c.dirs[d].affix_z = t[:, E:].t()
            c.dirs[d].affix_infix = self.position == "infix"


def _attach(site, name, s):
    m0 = site.mixers[0]
    width = m0.d_model if s.position == "outer" else m0.d_inner * (2 if s.store_z else 1)
    per_layer = 2 if site.kind == "vim" and s.dual and s.position != "outer" else 1
    tokens = AffixTokens(s.tokens, len(site.mixers), per_layer, width, s.projection, s.hidden)
    site.put(site.backbone.peft, name, tokens, m0.in_proj.weight)
    site.per_mixer(name, lambda m: {name: AffixLayer(tokens, site.mixers.index(m), s.position, per_layer == 2,
                                                     s.store_z)})


register("affix", AffixSettings, "Affix tuning", "learned tokens prefixed to every mixer's sequence before conv1d",
         _attach)

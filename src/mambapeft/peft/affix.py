"""Affix tuning: per layer, n learned tokens prefixed to the mixer's sequence before conv1d.

They pass through conv1d, write into the SSM state and their outputs are dropped, so the real
sequence starts from a learned state. The z half of a token only gates its own dropped output
(zero gradient), so by default only the x half (width E) is stored; `store_z` keeps the paper's
2E layout. Position "infix" spreads the tokens between n+1 equal chunks of the sequence (of the
prefill, when decoding); "outer" puts width-D prefix tokens before in_proj instead. One shared `AffixTokens`
module holds every layer's tokens (the projection spans all layers); each mixer gets a small
`AffixLayer` view that reads its slice.
"""
import torch
import torch.nn as nn

from ..models.adapter import ModelAdapter
from ..models.mixer import MixerAdapter
from .prompt import Reparam


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

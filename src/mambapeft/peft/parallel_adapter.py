import torch.nn as nn

from ..models.mixer import MixerAdapter


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
        return out + (self.up(self.dropout(self.down(g.to(self.down.weight.dtype)).relu())) * self.scale).to(out.dtype)

import torch
import torch.nn as nn

from .mixer import MambaMixer
from .norm import RMSNorm


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class MambaBlock(nn.Module):
    """Pre-norm residual block: h + drop_path(mixer(norm(h)))."""

    def __init__(self, d_model, eps=1e-5, residual_in_fp32=True, drop_path=0.0, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.mixer = MambaMixer(d_model, **mixer_kwargs)
        self.residual_in_fp32 = residual_in_fp32
        self.drop_path = DropPath(drop_path)

    def forward(self, h, mask=None, state=None):
        residual = h.float() if self.residual_in_fp32 else h
        out = self.mixer(self.norm(h, self.norm.weight.dtype), mask, state)
        return residual + self.drop_path(out)


def prompt_tokens(adapters):
    tokens = [t for t in (a.prompt() for a in adapters) if t is not None]
    return torch.cat(tokens, 0) if tokens else None

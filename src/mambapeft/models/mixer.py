"""The Mamba-1 mixer, one- or two-directional, built around one `compose()`.

`compose()` returns every tensor the scan consumes, with each attached PEFT method folded in.
All scan backends read only what it returns, so no backend can silently skip an adapter.
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.scan import resolve_backend, selective_scan
from .adapter import active
from .tokens import infix_offsets, insert_tokens_at, take_positions


@dataclass
class ScanTensors:
    """What one scan direction consumes. x_proj rows are [delta (R) | B (N') | C (N')]."""
    conv_w: torch.Tensor            # (E, k)
    conv_b: torch.Tensor | None     # (E,)
    x_proj: torch.Tensor            # (R + 2N', E)
    dt_w: torch.Tensor              # (E, R)
    dt_b: torch.Tensor              # (E,)
    A_log: torch.Tensor             # (E, N'); the scan reads A = -exp(A_log)
    D: torch.Tensor                 # (E,)
    affix: torch.Tensor | None = None    # (E, n): x-half tokens prefixed to this direction's conv input
    affix_z: torch.Tensor | None = None  # (E, n): their z half, which only gates discarded outputs
    affix_infix: bool = False            # spread the tokens between n+1 equal chunks instead of a prefix
    rms_eps: float | None = None         # FalconMamba: weightless RMS norms on dt, B and C (see ssm_inputs)
    rms_cols: tuple = (0, 0)             # the columns of B and C the norm covers: the model's own N states

    @property
    def A(self):
        return -torch.exp(self.A_log.float())

    @property
    def state_size(self):
        return self.A_log.shape[1]


@dataclass
class Composed:
    in_proj: torch.Tensor           # (2E, D)
    in_bias: torch.Tensor | None
    out_proj: torch.Tensor          # (D, E)
    out_bias: torch.Tensor | None
    dirs: list = field(default_factory=list)  # ScanTensors, forward first
    affix_h: torch.Tensor | None = None       # (n, D) "outer" affix tokens, before in_proj

    def matmul_weights(self):
        """in_proj, out_proj, then x_proj and dt_proj per direction: the order of MambaMixer.matmul_weights."""
        return [self.in_proj, self.out_proj] + [w for s in self.dirs for w in (s.x_proj, s.dt_w)]


@dataclass
class LowRankRows:
    """An adapter that adds scale * up @ down(h) to rows start..stop of in_proj's output."""
    start: int
    stop: int
    down: Callable              # h (bT, D) -> (bT, r), dropout included
    up: torch.Tensor            # (stop - start, r)
    scale: float


def weightless_rms_norm(x, eps):
    """FalconMamba's norm without weight, in fp32 and cast back, as transformers' WeightlessRMSNorm."""
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def ssm_inputs(s: ScanTensors, x_dbl):
    """x_dbl (..., R + 2N') -> dt (..., R), B, C (..., N'), with FalconMamba's norms when s.rms_eps is set.

    Only the model's own N columns of B and C (s.rms_cols) are normalised, over those N: columns
    that Additional-scan adds stay raw, so its zero-initialised C rows leave the output exactly
    unchanged and the original states see the same B and C as in FalconMamba."""
    R, N = s.dt_w.shape[1], s.state_size
    dt, B, C = x_dbl.split([R, N, N], dim=-1)
    if s.rms_eps is None:
        return dt, B, C
    a, b = s.rms_cols

    def norm(t):
        if (a, b) == (0, N):
            return weightless_rms_norm(t, s.rms_eps)
        return torch.cat([t[..., :a], weightless_rms_norm(t[..., a:b], s.rms_eps), t[..., b:]], -1)
    return weightless_rms_norm(dt, s.rms_eps), norm(B), norm(C)


class MixerAdapter(nn.Module):
    """Base of per-layer PEFT methods. Override any hook; `order` sorts weight edits."""
    order = 0
    mergeable = True   # False when merge_and_unload cannot fold the method into the base weights
    active = True      # False while another adapter is selected or adapters are disabled

    def compose(self, c: Composed, mixer, merge=False) -> None:
        """Edit c in place (the weight edits the scan reads)."""

    def fold(self, c: Composed, mixer) -> None:
        """Merging only: add an activation-form method's weight delta to c. Called after every
        adapter's compose(), since in the forward it acts on the output of the composed weight."""

    def reads_padding(self) -> bool:
        """True when the method's effect on real tokens depends on where the padding is (not only on
        pads being zeroed): then even a right-padded batch needs its attention mask."""
        return False

    def adapt_xz(self, h, xz):                           # activation form on in_proj's output
        return xz

    def adapt_out(self, g, out):                         # activation form on out_proj's output
        return out

    # What the fused CUDA path (mixer_cuda.py) needs to keep an activation-form adapter inside its
    # kernels. [] = the adapter does not act there; None = it does, in a form the path cannot lay out
    # (then the unfused route runs). Overriding adapt_xz / adapt_out without these means None.
    def in_proj_rows(self) -> list[LowRankRows] | None:
        return [] if type(self).adapt_xz is MixerAdapter.adapt_xz else None

    def out_proj_taps(self) -> list | None:
        """[(down weight V (r, E), finish(V g, out) -> out)]: V's rows are appended to out_proj's."""
        return [] if type(self).adapt_out is MixerAdapter.adapt_out else None

    def edited_weights(self, mixer) -> list:
        """The mixer's matmul weights (MambaMixer.matmul_weights) that compose() computes on, e.g. adds a
        delta to. cast_frozen keeps these as loaded: a sum of a bf16-rounded weight is not the bf16
        rounding of the sum. Default: every one that compose() replaces; an adapter that only reads a
        weight, or takes whole rows of it, says which (it is exact in any dtype)."""
        with torch.no_grad():
            composed = mixer.compose(adapters=[self]).matmul_weights()
        return [w for w, c in zip(mixer.matmul_weights(), composed) if c is not w]


class MambaMixer(nn.Module):
    DIRECTION_SUFFIX = ("", "_b")

    def __init__(self, d_model, d_state=16, expand=2, d_conv=4, dt_rank=None, bias=False,
                 conv_bias=True, bidirectional=False, divide_out=True, rms_eps=None):
        super().__init__()
        E, R = expand * d_model, dt_rank or math.ceil(d_model / 16)
        self.d_model, self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_model, E, d_state, d_conv, R
        self.bidirectional, self.divide_out = bidirectional, divide_out
        self.rms_eps = rms_eps  # FalconMamba's mixer_rms_eps; None for Mamba
        self.recompute_z = False  # set_recompute_z: the CUDA fused route makes z again in backward
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.out_proj = nn.Linear(E, d_model, bias=bias)
        for s in self.directions:
            setattr(self, "conv1d" + s, nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias))
            setattr(self, "x_proj" + s, nn.Linear(E, R + 2 * d_state, bias=False))
            setattr(self, "dt_proj" + s, nn.Linear(R, E, bias=True))
            setattr(self, self.a_name(s), nn.Parameter(torch.empty(E, d_state)))
            setattr(self, "D" + s, nn.Parameter(torch.empty(E)))
        self.peft = nn.ModuleDict()

    @property
    def directions(self):
        return self.DIRECTION_SUFFIX[: 2 if self.bidirectional else 1]

    @staticmethod
    def a_name(suffix):
        return "A_log" if not suffix else "A" + suffix + "_log"

    @torch.no_grad()
    def reset_parameters(self, dt_min=0.001, dt_max=0.1, dt_floor=1e-4, dt_scale=1.0):
        """The Mamba initialisation (S4D-real A, dt bias = softplus^-1 of a log-uniform step)."""
        for s in self.directions:
            A = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
            getattr(self, self.a_name(s)).copy_(torch.log(A))
            getattr(self, "D" + s).fill_(1.0)
            dt_proj = getattr(self, "dt_proj" + s)
            std = self.dt_rank ** -0.5 * dt_scale
            nn.init.uniform_(dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def matmul_weights(self):
        """The weights only matrix products read (F.linear under autocast, or cast to the compute dtype
        by the fused path): in_proj, out_proj, x_proj and dt_proj of each direction. Their biases,
        conv1d, A_log and D are read in fp32 by the kernels and are not among them."""
        return [self.in_proj.weight, self.out_proj.weight] + \
            [getattr(self, n + s).weight for s in self.directions for n in ("x_proj", "dt_proj")]

    def adapters(self):
        return sorted(active(self.peft), key=lambda a: a.order)

    def compose(self, merge=False, adapters=None) -> Composed:
        c = Composed(self.in_proj.weight, self.in_proj.bias, self.out_proj.weight, self.out_proj.bias)
        for s in self.directions:
            conv, dt = getattr(self, "conv1d" + s), getattr(self, "dt_proj" + s)
            c.dirs.append(ScanTensors(
                conv_w=conv.weight[:, 0], conv_b=conv.bias, x_proj=getattr(self, "x_proj" + s).weight,
                dt_w=dt.weight, dt_b=dt.bias, A_log=getattr(self, self.a_name(s)),
                D=getattr(self, "D" + s), rms_eps=self.rms_eps, rms_cols=(0, self.d_state)))
        adapters = self.adapters() if adapters is None else adapters
        for a in adapters:
            a.compose(c, self, merge)
        for a in adapters if merge else ():
            a.fold(c, self)
        return c

    def project_in(self, h, c):
        xz = F.linear(h, c.in_proj, c.in_bias)
        for a in self.adapters():
            xz = a.adapt_xz(h, xz)
        return xz

    def forward(self, h, mask=None, state=None):
        """h (b, T, D); mask (b, T) with 1 for real tokens; state: a LayerState to read and update."""
        if self.bidirectional and (mask is not None or state is not None):
            raise ValueError("the bidirectional mixer takes neither padding masks nor decoding state")
        c = self.compose()
        if h.is_cuda and resolve_backend(h) == "cuda":  # the mamba_ssm kernels: models/mixer_cuda.py
            from . import mixer_cuda
            return mixer_cuda.forward(self, c, h, mask, state)
        if mask is not None:
            h = h * mask[..., None].to(h.dtype)
        xz = self.project_in(h, c).transpose(1, 2)      # (b, 2E, T)
        x, z = xz.chunk(2, dim=1)
        affix = self._affix(c)
        if not self.bidirectional:
            g = self.scan_direction(x, z, c.dirs[0], affix[0], mask, state, 0)
        else:
            g = self.both_directions(x, z, c, affix, lambda *a: self.scan_direction(*a[:4], None, None, a[4]))
        return self.project_out(g, c)

    def both_directions(self, x, z, c, affix, scan):
        """Vim: scan(x, z, tensors, affix, d) on the sequence and on its time reversal, combined."""
        g_f = scan(x, z, c.dirs[0], affix[0], 0)
        g_b = scan(x.flip(-1), z.flip(-1), c.dirs[1], affix[1], 1).flip(-1)
        return (g_f + g_b) / 2 if self.divide_out else g_f + g_b

    def project_out(self, g, c):
        """Gated scan output g (b, E, T) -> out_proj plus the adapters that read g, (b, T, D)."""
        g = g.transpose(1, 2)
        out = F.linear(g, c.out_proj, c.out_bias)
        for a in self.adapters():
            out = a.adapt_out(g, out)
        return out

    def _affix(self, c):
        """Per direction, None or the (x half, z half) of its affix tokens, each (E, n)."""
        pairs = [None if s.affix is None else
                 (s.affix, s.affix_z if s.affix_z is not None else torch.zeros_like(s.affix)) for s in c.dirs]
        if c.affix_h is not None:  # outer affix: width-D tokens go through in_proj like real ones
            x_half = self.project_in(c.affix_h, c)[:, : self.d_inner].t()
            outer = (x_half, torch.zeros_like(x_half))
            pairs = [outer if p is None else tuple(torch.cat([o, t], 1) for o, t in zip(outer, p)) for p in pairs]
        return pairs

    @staticmethod
    def insert_affix(x, z, s: ScanTensors, affix, mask):
        """Put one direction's affix tokens (a pair from `_affix`) into x and z (b, E, T).

        Returns x, z, their mask and `drop(y)`, which takes the tokens' positions out of an output
        with time on its last dimension."""
        n = affix[0].shape[1]
        offsets = infix_offsets(n, x.shape[-1], mask) if s.affix_infix else None
        x, new_mask, keep = insert_tokens_at(x, affix[0], mask, 2, offsets)
        z, _, _ = insert_tokens_at(z, affix[1], mask, 2, offsets)
        return x, z, new_mask, lambda y: take_positions(y, n, keep, y.dim() - 1)

    def scan_direction(self, x, z, s: ScanTensors, affix, mask, state, d):
        """x, z (b, E, T) -> gated scan output (b, E, T) for one direction."""
        k = self.d_conv
        fresh = state is None or state.ssm[d] is None
        drop = None
        if affix is not None and fresh:
            x, z, mask, drop = self.insert_affix(x, z, s, affix, mask)
        if mask is not None:
            x = x * mask[:, None].to(x.dtype)
        if fresh:
            x_full = F.pad(x, (k - 1, 0))
        else:
            x_full = torch.cat([state.conv[d].to(x.dtype), x], dim=-1)
        u = F.silu(F.conv1d(x_full, s.conv_w[:, None], s.conv_b, groups=x.shape[1]))
        if mask is not None:
            u = u * mask[:, None].to(u.dtype)
        x_dbl = F.linear(u.transpose(1, 2), s.x_proj)   # (b, L, R + 2N')
        dt, B, C = ssm_inputs(s, x_dbl)
        delta = F.linear(dt, s.dt_w).transpose(1, 2)    # (b, E, L)
        out = selective_scan(u, delta, s.A, B.transpose(1, 2), C.transpose(1, 2), s.D.float(), z,
                             delta_bias=s.dt_b.float(), delta_softplus=True,
                             initial_state=None if fresh else state.ssm[d],
                             return_last_state=state is not None)
        y = out[0] if state is not None else out
        if state is not None:
            state.conv[d] = x_full[..., x_full.shape[-1] - (k - 1):].detach()
            state.ssm[d] = out[1].detach()
        return drop(y) if drop else y


def set_recompute_z(model, on):
    """On the CUDA fused route, let mixers of `model` keep only the x half of in_proj's output for
    backward and make the z half (the gate) again there: half of what the fused function keeps per
    layer, for one more product of in_proj's z rows. on: True (every mixer), False (none) or a number
    n (the first n mixers: memory for time in steps of one layer). Returns how many were set."""
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    n = len(mixers) if on is True else int(on)
    for i, m in enumerate(mixers):
        m.recompute_z = i < n
    return min(n, len(mixers))

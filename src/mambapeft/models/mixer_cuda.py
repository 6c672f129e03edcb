"""The mixer on mamba_ssm's and causal_conv1d's CUDA kernels, for every PEFT method.

It reads the same `Composed` tensors as the readable path in mixer.py (`MambaMixer.compose()`), so
no method is skipped. Three routes:

- training / plain forward (no padding mask, no decoding state): the fused
  conv -> x_proj -> dt_proj -> scan -> gate -> out_proj function with a memory-saving backward:
  ours (ops/mamba_inner.py: no gradient for frozen weights, no layout copies) or, with
  MAMBAPEFT_INNER=mamba_ssm, mamba_ssm's `mamba_inner_fn`.
  * activation-form in_proj / X / Z LoRA act on xz before it (`project_in`), so they stay in
    activation form (and keep their dropout);
  * affix tokens become extra xz columns in front (x half = token, z half = its stored z half or 0):
    on a unidirectional model in_proj leaves room for them (its input padded with zero rows) and they
    are written there in place, else xz is copied into a longer buffer; as a prefill (our CUDA scan,
    the carried state or Triton) their output rows are never made, as extra positions they are dropped;
  * Additional-scan rows and the new A columns are already part of the composed x_proj and A_log;
  * adapters that read the gated output g (activation-form out_proj LoRA, the parallel adapter)
    only need V g for their down projection V. Since out_proj is linear, their V's rows are
    appended to the out_proj weight handed to the kernel: it returns [W_out g | V g], exactly, with
    gradients for V through the kernel's out_proj weight gradient (ours takes V apart, so that a
    frozen W_out gets none). Dropout and ReLU then act
    on V g outside the kernel, as in the readable path;
  * Vim: out_proj is linear, so each direction calls the kernel with W_out/2 (divide_out) and the
    outputs add (the backward one flipped back in time).
- padding masks, Vim with unknown output adapters, prefill of a decoding state, and FalconMamba
  (whose norms mamba_inner_fn applies differently from transformers' inference and leaves out
  of its backward):
  `causal_conv1d_fn` + `selective_scan_fn` return g, then out_proj and the output adapters.
  Masks act as in `MambaMixer.scan_direction`: x zeroed before the conv and u after it at pads,
  affix tokens inserted after the left pads.
- decoding (state already filled): `causal_conv1d_update` + our one-kernel state update
  (ops/decode_triton.py, which reads dt_proj, A_log and D as composed), one token at a time, in
  place on the cache's tensors (conv (b, E, k-1) in the input dtype, ssm (b, E, N') fp32); they hold
  exactly what `scan_direction` would store, so CPU and CUDA steps can alternate.
"""
import os

import torch
import torch.nn.functional as F

from ..ops import mamba_inner
from ..ops.scan import cuda_ext_available, triton_available
from .mixer import ssm_inputs

try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
except Exception:  # noqa: BLE001
    mamba_inner_fn = None


def available():
    return mamba_inner_fn is not None and torch.cuda.is_available()


def forward(m, c, h, mask=None, state=None):
    """MambaMixer.forward on the kernels; `c` is m.compose()."""
    if mask is not None:
        h = h * mask[..., None].to(h.dtype)
    affix = m._affix(c)
    # FalconMamba never takes the fused kernel: mamba_inner_fn's b/c/dt_rms_weight normalise dt over E
    # after dt_proj (not the rank-R input, as transformers' inference does) and its backward leaves
    # the norms out of the gradients. The unfused route below applies them in torch (ssm_inputs).
    taps = _output_taps(m) if mask is None and state is None and c.dirs[0].rms_eps is None else None
    rows = [a.in_proj_rows() for a in m.adapters()]
    prefix = _prefix_room(m, c, affix, rows) if taps is not None else None
    xz, remake_z = _project_in(m, c, h, prefix, rows)     # (b, 2E, [p +] T), time contiguous
    if taps is not None:
        return _fused(m, c, xz, affix, taps, remake_z, prefix)
    x, z = xz.chunk(2, dim=1)
    if not m.bidirectional:
        s = c.dirs[0]
        if state is not None and state.ssm[0] is not None:
            g = torch.cat([_decode_step(m, x[..., t:t + 1], z[..., t:t + 1], s,
                                        None if mask is None else mask[:, t:t + 1], state, 0)
                           for t in range(x.shape[-1])], -1)
        else:
            g = _scan(m, x, z, s, affix[0], mask, state, 0)
    else:
        g = m.both_directions(x, z, c, affix, lambda *a: _scan(m, *a[:4], None, None, a[4]))
    return m.project_out(g, c)


def _project_in(m, c, h, prefix=None, rows=None):
    """xz as W_in @ h^T, like mamba_ssm's own Mamba: (2E, bT) memory viewed as (b, 2E, T), so neither
    xz nor its gradient is transposed and copied around the fused kernel. Adapters that add low-rank
    rows to in_proj's output (MixerAdapter.in_proj_rows) add them in the same layout.
    prefix = (tokens' x half, z half, p) from _prefix_room: xz gets p columns in front of every sequence
    (h padded with p zero rows, a quarter of xz's size), zeros then the tokens written there in place,
    instead of xz being copied into a longer buffer. rows: the adapters' in_proj_rows(), when the
    caller has them.
    -> xz, and with m.recompute_z a function that makes its z half again as this made it (else None)."""
    if prefix is not None:
        h = F.pad(h, (0, 0, prefix[2], 0))
    b, T, _ = h.shape
    h2 = h.reshape(b * T, -1)
    rows = [a.in_proj_rows() for a in m.adapters()] if rows is None else rows
    if any(r is None for r in rows):           # an adapter we cannot lay out here (never with a prefix)
        return m.project_in(h, c).transpose(1, 2), None
    xz = c.in_proj @ h2.t()
    if c.in_bias is not None:
        xz = xz + c.in_bias[:, None].to(xz.dtype)
    added = []
    for low in (low for r in rows for low in r):
        p = low.down(h2).t().to(xz.dtype)                                             # (r, bT)
        added.append((low, low.up.to(xz.dtype), p))
        xz = _AddRows.apply(xz, *added[-1][1:], low.start, low.stop, low.scale)
    if prefix is not None:
        xz = _Tokens.apply(xz, prefix[0], prefix[1], b, prefix[2])
    remake_z = _remaker(c, h2, added, xz.dtype, b) if m.recompute_z else None
    return xz.view(-1, b, T).transpose(0, 1), remake_z


def _remaker(c, h2, added, dtype, b):
    """-> a function giving xz's z half (b, E, T) again, as _project_in made it: the same products in
    the same dtype and order, the low-rank rows with the forward's own down projections (dropout
    included). Run in backward, without autograd."""
    E = c.in_proj.shape[0] // 2

    @torch.no_grad()
    def remake():
        z = c.in_proj[E:].to(dtype) @ h2.to(dtype).t()
        if c.in_bias is not None:
            z = z + c.in_bias[E:, None].to(dtype)
        for low, up, p in added:
            if low.stop > E:
                lo = max(low.start, E)
                z[lo - E:low.stop - E].addmm_(up[lo - low.start:], p, alpha=low.scale)
        return z.view(E, b, -1).transpose(0, 1)
    return remake


class _AddRows(torch.autograd.Function):
    """xz[start:stop] += scale * up @ p, in place: no full-size delta, pad or add. The backward hands
    xz's gradient on untouched (an in-place addmm_ on a slice of xz would make autograd clone all of
    it, CopySlices: about 1.6 ms a step at the mamba-130m shape on the H200)."""

    @staticmethod
    def forward(ctx, xz, up, p, start, stop, scale):
        xz[start:stop].addmm_(up, p, alpha=scale)
        ctx.mark_dirty(xz)
        ctx.save_for_backward(up, p)
        ctx.rows = start, stop, scale
        return xz

    @staticmethod
    def backward(ctx, g):
        up, p = ctx.saved_tensors
        start, stop, scale = ctx.rows
        rows = g[start:stop]
        d_up = (rows @ p.t()).mul_(scale) if ctx.needs_input_grad[1] else None
        d_p = (up.t() @ rows).mul_(scale) if ctx.needs_input_grad[2] else None
        return g, d_up, d_p, None, None, None


class _Tokens(torch.autograd.Function):
    """In xz's (2E, b*(p+T)) memory, the first p columns of every sequence become zeros and then the
    affix tokens (x half, z half: (E, n) each), in place (on the 2-D product itself: no CopySlices).
    Backward: the tokens' gradient is the sum of those columns over the batch; the columns' gradient
    is then zeroed in the incoming buffer (our inner function's fresh xz gradient), as what in_proj
    produced there was overwritten."""

    @staticmethod
    def forward(ctx, xz, tok_x, tok_z, b, p):
        _fill_prefix(xz.view(xz.shape[0], b, -1)[:, :, :p], tok_x, tok_z)
        ctx.mark_dirty(xz)
        ctx.shape, ctx.dtypes = (tok_x.shape[1], b, p), (tok_x.dtype, tok_z.dtype)
        return xz

    @staticmethod
    def backward(ctx, g):
        n, b, p = ctx.shape
        g = g if g.is_contiguous() else g.contiguous()
        cols = g.view(g.shape[0], b, -1)[:, :, :p]
        grads = _token_grads(cols[:, :, p - n:], ctx.dtypes)
        cols.zero_()
        return (g, *grads, None, None)


def _fill_prefix(cols, tok_x, tok_z):
    """cols (2E, b, p) of xz: zeros, then the tokens (x half, z half: (E, n) each) in the last n."""
    E, n = tok_x.shape
    p = cols.shape[-1]
    cols[:, :, :p - n].zero_()
    cols[:E, :, p - n:] = tok_x.to(cols.dtype)[:, None, :]
    cols[E:, :, p - n:] = tok_z.to(cols.dtype)[:, None, :]


def _token_grads(cols, dtypes):
    """The tokens' columns (2E, b, n) of xz's gradient -> the gradients of their x and z halves (in
    `dtypes`): the tokens are shared by every row of the batch."""
    tok = cols.sum(1)
    E = tok.shape[0] // 2
    return tok[:E].to(dtypes[0]), tok[E:].to(dtypes[1])


def _prefix_room(m, c, affix, rows):
    """(tokens' x half, z half, p) when the fused route will put prefix affix tokens in front of xz on
    our inner function (p: the tokens behind zero columns that align the sequence, see _prefix_width),
    else None (also when an adapter's in_proj rows, `rows`, cannot be laid out). Unidirectional models
    only: Vim's backward direction flips xz, tokens and all."""
    s = c.dirs[0]
    if m.bidirectional or affix[0] is None or s.affix_infix or not _ours() or any(r is None for r in rows):
        return None
    return affix[0][0], affix[0][1], _prefix_width(affix[0][0].shape[1], affix_scan(c.in_proj.device))


def _ours():
    """Our inner function (it calls the same wheels' lower-level entry points; where those do not
    import, mamba_inner_fn runs)."""
    return inner_impl() == "ours" and None not in (mamba_inner.selective_scan_cuda, mamba_inner.conv_fwd)


# ---- output adapters as extra out_proj rows ---------------------------------------------------
def _output_taps(m):
    """[(down weight (r, E), finish(p, out) -> out)] for every adapter that reads g, or None when
    one of them cannot be laid out (then the unfused route runs)."""
    taps = [a.out_proj_taps() for a in m.adapters()]
    return None if any(t is None for t in taps) else [tap for t in taps for tap in t]


def inner_impl():
    """"ours" (ops/mamba_inner.py, the default) or "mamba_ssm" (its mamba_inner_fn), from the
    environment variable MAMBAPEFT_INNER, read at each call so one process can compare both."""
    name = os.environ.get("MAMBAPEFT_INNER", "ours")
    if name not in ("ours", "mamba_ssm"):
        raise ValueError(f"MAMBAPEFT_INNER={name!r}: expected 'ours' or 'mamba_ssm'")
    return name


AFFIX_SCANS = mamba_inner.PREFILL_MODES + ("mamba_ssm",)


def affix_scan(device):
    """How our fused inner function scans prefix affix tokens, from MAMBAPEFT_AFFIX_SCAN (read at each
    call so one process can compare them):
    - "cuda" (the default where our CUDA scan builds, ops/scan_cuda_ext.py): the tokens are a prefill
      whose last state the sequence's scan starts from, both on our CUDA scan;
    - "carry" (the default where it does not and triton imports): the same prefill, the sequence on
      mamba_ssm's scan from zero plus the state carried forward (ops/scan_carry.py): 1024 + n positions
      cost 1024 on mamba_ssm's templates, not its 2048 one;
    - "triton": the same prefill, the sequence on our Triton scan (4x slower than mamba_ssm's on the
      H200, bench/results/issue13/);
    - "mamba_ssm" (the default without either): the tokens are extra positions of the sequence's scan
      (mamba_inner.inner_scan's: mamba_ssm's, or ours at the training shapes where it builds), their
      outputs dropped."""
    name = os.environ.get("MAMBAPEFT_AFFIX_SCAN")
    if name is None:
        return "cuda" if cuda_ext_available() else "carry" if triton_available() else "mamba_ssm"
    if name not in AFFIX_SCANS:
        raise ValueError(f"MAMBAPEFT_AFFIX_SCAN={name!r}: expected one of {', '.join(AFFIX_SCANS)}")
    if name == "cuda" and not cuda_ext_available():
        raise ValueError("MAMBAPEFT_AFFIX_SCAN=cuda: our CUDA scan did not build (it needs CUDA and nvcc; "
                         "the log says why)")
    if name in ("carry", "triton") and not triton_available():
        raise ValueError(f"MAMBAPEFT_AFFIX_SCAN={name}: the prefill needs the triton package "
                         "(and CUDA, or TRITON_INTERPRET=1)")
    return name


def _fused(m, c, xz, affix, taps, remake_z=None, prefix=None):
    """The mixer on our fused inner function (or mamba_inner_fn), with the output adapters' `taps`;
    xz has the prefix columns of _prefix_room in front when `prefix` is given."""
    ours = _ours()
    D = c.out_proj.shape[0]
    W, bias = c.out_proj, c.out_bias
    ws = [w.to(W.dtype) for w, _ in taps]
    extra = (ws[0] if len(ws) == 1 else torch.cat(ws, 0)) if ws else None
    if not ours and extra is not None:   # mamba_inner_fn: one out_proj weight, one gradient for all rows
        W, extra = torch.cat([W, extra], 0), None
        if bias is not None:
            bias = F.pad(bias, (0, W.shape[0] - D))
    if m.bidirectional and m.divide_out:
        W = W / 2
        extra = extra / 2 if extra is not None else None
    if not ours and bias is not None and torch.is_autocast_enabled("cuda"):
        bias = bias.float()
    out = None
    for d, s in enumerate(c.dirs):
        xz_d = xz if d == 0 else xz.flip(-1)
        drop, prefill = None, None
        if affix[d] is not None and ours and not s.affix_infix:   # p columns in front: zeros, then the tokens
            mode, n = affix_scan(xz.device), affix[d][0].shape[1]
            p = _prefix_width(n, mode)
            if prefix is None:   # else they are in xz already (_prefix_room: d == 0, unidirectional)
                xz_d = _prefix_flat(xz_d, affix[d], p)
            if mode != "mamba_ssm":   # a prefill: the inner function returns only the sequence
                prefill = (mode, p - n, p)
            else:
                drop = lambda y, p=p, T=xz_d.shape[-1] - p: y.narrow(-1, p, T)  # noqa: E731
        elif affix[d] is not None:  # x and z halves of the tokens become extra xz columns
            x, z = xz_d.chunk(2, dim=1)
            x, z, _, drop = m.insert_affix(x, z, s, affix[d], None)
            xz_d = torch.cat([x, z], 1)
        if ours:   # xz stays in the layout _project_in made; frozen weights get no gradient
            z_fn = None
            if remake_z is not None and affix[d] is None:   # (a prefix's z columns are not made again)
                z_fn = remake_z if d == 0 else lambda: remake_z().flip(-1)
            o = mamba_inner.mamba_inner(xz_d, s.conv_w, s.conv_b, s.x_proj, s.dt_w, W,
                                        bias if d == 0 else None, s.A, s.D, s.dt_b, extra, prefill=prefill,
                                        z_fn=z_fn)
        else:
            o = mamba_inner_fn(xz_d.contiguous(), s.conv_w[:, None], s.conv_b, s.x_proj, s.dt_w, W,
                               bias if d == 0 else None, s.A, None, None, s.D.float(),
                               delta_bias=s.dt_b.float(), delta_softplus=True)
        if drop:
            o = drop(o.transpose(1, 2)).transpose(1, 2)
        if d == 1:
            o = o.flip(1)
        out = o if out is None else out + o
    if not taps:
        return out
    res, off = out[..., :D], D
    for w, finish in taps:
        res = finish(out[..., off:off + w.shape[0]], res)
        off += w.shape[0]
    return res


def _prefix_width(n, mode):
    """Columns in front of every sequence for n affix tokens scanned by `mode` (affix_scan): with a
    prefill, zero columns go in front of the tokens so that the sequence starts on a 16-byte boundary
    for bf16 (a multiple of 8), which mamba_ssm's vectorised loads of an even-length sequence need;
    zeros there equal the conv's own left padding. As extra positions, the tokens alone."""
    align = 8 if mode != "mamba_ssm" else 1
    return -(-n // align) * align


def _prefix_flat(xz, affix, p):
    """Affix tokens (x half, z half), each (E, n), behind p - n zero columns in front of every sequence
    of xz (b, 2E, T), built in one copy in the layout ops/mamba_inner.py takes ((2E, b*(p+T)) memory)."""
    return _Prefixed.apply(xz, affix[0], affix[1], p)


class _Prefixed(torch.autograd.Function):
    """_prefix_flat's copy, with a backward that hands out views of the incoming gradient (sliced
    assignments would make autograd clone the whole buffer first)."""

    @staticmethod
    def forward(ctx, xz, tok_x, tok_z, p):
        b, E2, T = xz.shape
        buf = xz.new_empty(E2, b, p + T)
        buf[:, :, p:] = xz.transpose(0, 1)
        _fill_prefix(buf[:, :, :p], tok_x, tok_z)
        ctx.p, ctx.n, ctx.dtypes = p, tok_x.shape[1], (tok_x.dtype, tok_z.dtype)
        return buf.transpose(0, 1)

    @staticmethod
    def backward(ctx, g):
        p, n = ctx.p, ctx.n
        return (g[..., p:], *_token_grads(g[..., p - n:p].transpose(0, 1), ctx.dtypes), None)


# ---- unfused: conv kernel + scan kernel, returning g -----------------------------------------
def _scan(m, x, z, s, affix, mask, state, d):
    """x, z (b, E, T) -> g (b, E, T); fills `state` (a fresh LayerState direction) when given."""
    k = m.d_conv
    drop = None
    if affix is not None:
        x, z, mask, drop = m.insert_affix(x, z, s, affix, mask)
    if mask is not None:
        x = x * mask[:, None].to(x.dtype)
    x = x.contiguous()
    u = causal_conv1d_fn(x, s.conv_w, s.conv_b, activation="silu")
    if mask is not None:
        u = u * mask[:, None].to(u.dtype)
    b, L = u.shape[0], u.shape[-1]
    x_dbl = F.linear(u.transpose(1, 2).reshape(b * L, -1), s.x_proj)    # (bL, R + 2N')
    dt, B, C = ssm_inputs(s, x_dbl)
    N = B.shape[-1]
    delta = (s.dt_w @ dt.t()).view(-1, b, L).transpose(0, 1)             # (b, E, L), L contiguous
    B = B.view(b, L, N).transpose(1, 2).contiguous()
    C = C.view(b, L, N).transpose(1, 2).contiguous()
    dtype = u.dtype
    out = selective_scan_fn(u, delta.to(dtype).contiguous(), s.A, B.to(dtype), C.to(dtype), s.D.float(),
                            z.to(dtype).contiguous(), s.dt_b.float(), True, state is not None)
    y = out[0] if state is not None else out
    if state is not None:
        state.conv[d] = F.pad(x, (k - 1, 0))[..., -(k - 1):].detach().contiguous()
        state.ssm[d] = out[1].detach().contiguous()
    return drop(y) if drop else y


def _decode_step(m, x, z, s, mask, state, d):
    """One token (x, z (b, E, 1)) from a filled state; updates state.conv[d] and state.ssm[d] in place."""
    from ..ops import decode_triton   # triton is there whenever mamba_ssm is
    conv, ssm = state.conv[d], state.ssm[d]
    if conv.dtype != x.dtype or not conv.is_contiguous():
        conv = conv.to(x.dtype).contiguous()
    if ssm.dtype != torch.float32 or not ssm.is_contiguous():
        ssm = ssm.float().contiguous()
    xt = x[..., 0]                    # channel stride b (xz is W_in @ h^T): both kernels take strides
    if mask is not None:
        xt = xt * mask.to(xt.dtype)
    u = causal_conv1d_update(xt, conv, s.conv_w, s.conv_b, activation="silu")
    if mask is not None:
        u = u * mask.to(u.dtype)
    dt, B, C = ssm_inputs(s, F.linear(u, s.x_proj))
    y = decode_triton.state_step(ssm, u, dt, s.dt_w.contiguous(), s.dt_b, s.A_log.contiguous(), B, C, s.D, z[..., 0])
    state.conv[d], state.ssm[d] = conv, ssm
    return y[..., None].to(x.dtype)

"""Our fused Mamba-1 inner function: conv -> x_proj -> dt_proj -> scan -> gate -> out_proj.

The same computation and the same memory-saving backward as mamba_ssm's `mamba_inner_fn` (the
conv output and delta are recomputed in backward, the gated output too), on the same kernels
(causal_conv1d's fwd/bwd, mamba_ssm's `selective_scan_cuda`), with two differences that the
GPU profile of a LoRA_p(X) step asked for:

- a weight gradient is computed only when that weight needs one (`ctx.needs_input_grad`): with
  LoRA_p(X), affix or Additional-scan's frozen parts, the out_proj, x_proj and dt_proj
  weight-gradient GEMMs and the bias / D / A reductions are skipped (the kernels still fill their
  own small dA, dD and conv weight sums, which cost nothing extra);
- no layout copies: xz is taken in the layout `MambaMixer`'s CUDA path produces, (2E, b*L) memory
  viewed as (b, 2E, L) ("flat": strides (L, b*L, 1)). In that layout every projection is one plain
  2-D GEMM on views: conv output u (E, bL) -> x_proj gives [dt; B; C] as (R + 2N, bL) rows, B and
  C are row blocks handed to the scan kernel as (b, 1, N, L) views (it reads strides), delta =
  W_dt @ dt is (E, bL) again, and the gradients come back in the same layout. Any other layout is
  copied into it once at the start (correct, just not free).

Extra rows of out_proj (`out_extra`, e.g. the down projection of an output adapter, see
mixer_cuda.py) get their own gradient, so a frozen out_proj next to a trainable adapter costs only
the adapter's small GEMM.

The scan is a ScanKernel (a forward and a backward function) that `inner_scan` picks per call:
`EXT_SCAN`, our CUDA scan (ops/scan_cuda_ext.py), at the training shapes where it is faster than
mamba_ssm's, else `SCAN`, mamba_ssm's kernel; MAMBAPEFT_INNER_SCAN forces either. `SCAN` is also the seam
where another scan can be dropped in (`mamba_inner.SCAN = ScanKernel(fwd, bwd)`).

Affix tokens as a prefill (`prefill`, chosen by mixer_cuda with MAMBAPEFT_AFFIX_SCAN): the tokens stay
columns of xz in front of the sequence, so the conv, x_proj and dt_proj (cheap) see them as before and
they feed the first positions' conv windows; but only the sequence's rows are scanned with D and the
gate and go to out_proj. The token positions are scanned from a zero state, and the sequence continues
from the state they leave: with mode "cuda" (the default where it builds) both on our CUDA scan
(ops/scan_cuda_ext.py), which starts from a state; with mode "carry" the
tokens on the Triton scan and the sequence on mamba_ssm's kernel from zero plus that state carried
forward (ops/scan_carry.py), so 1024 + 3 positions cost 1024 on mamba_ssm's templates rather than its
2048 one; with mode "triton" both on the Triton scan. In backward the state's gradient is the
prefill's dlast: the tokens get their gradient through the state and through the conv. Without
`prefill` the tokens are extra positions of the scan (mixer_cuda._prefix_flat) and the caller drops their
output rows.
"""
import os
from dataclasses import dataclass
from typing import Callable

import torch

try:  # the wheels may be absent, or built for another torch / CUDA
    import causal_conv1d_cuda
    import selective_scan_cuda
    from causal_conv1d import cpp_functions  # noqa: F401 - causal_conv1d >= 1.5: the argument order used below
except Exception:  # noqa: BLE001
    selective_scan_cuda = causal_conv1d_cuda = None


# causal_conv1d's own Python entry points (cpp_functions) go through torch.library custom ops, whose
# dispatch cost about 0.2 ms a forward call and 0.7 ms a backward call on the host: with three calls
# a layer that was a third of an eager mamba-130m LoRA step's host time, in a step the host, not the
# GPU, was bound by (bench/results/issue13/s4/). Inside our own autograd function nothing needs the
# custom op, so these call the extension directly, with the same arguments and results.
def _conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
    out = torch.empty_like(x)
    causal_conv1d_cuda.causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, out, final_states_out, silu)
    return out


def _conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial_states, silu):
    """-> dx, dweight, dbias (in weight's and bias' dtypes), None; no initial-state gradient."""
    if return_dinitial_states:
        raise NotImplementedError("the initial states' gradient is not used here")
    dx = torch.empty_like(x) if dx is None else dx
    dweight = torch.zeros_like(weight, dtype=torch.float32)
    dbias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
    causal_conv1d_cuda.causal_conv1d_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
                                         dweight, dbias, None, silu)
    return dx, dweight.to(weight.dtype), dbias.to(bias.dtype) if dbias is not None else None, None


conv_fwd, conv_bwd = (_conv_fwd, _conv_bwd) if causal_conv1d_cuda is not None else (None, None)


def available():
    return selective_scan_cuda is not None and conv_fwd is not None and torch.cuda.is_available()


# ---- the scan seam ----------------------------------------------------------------------------
@dataclass
class ScanKernel:
    """forward(u, delta, A, B, C, D, z, delta_bias) -> (out_z, saved): u, delta, z (b, E, L) in
    one dtype with time contiguous, A (E, N) fp32, B, C (b, 1, N, L) views with time contiguous,
    D and delta_bias (E,) fp32, softplus on delta; out_z = (scan + D u) * silu(z); `saved` is what
    backward needs besides the inputs (recomputed ones are passed again).
    backward(u, delta, A, B, C, D, z, delta_bias, saved, dout, dz) -> (du, ddelta, dA, dB, dC, dD,
    ddelta_bias, out_z): dz is a preallocated (b, E, L) view to write z's gradient into, out_z the
    recomputed gated output (for out_proj's weight gradient)."""
    forward: Callable
    backward: Callable


def _mamba_ssm_fwd(u, delta, A, B, C, D, z, delta_bias):
    out, states, out_z = selective_scan_cuda.fwd(u, delta, A, B, C, D, z, delta_bias, True)
    return out_z, (states, out)


def _mamba_ssm_bwd(u, delta, A, B, C, D, z, delta_bias, saved, dout, dz):
    states, out = saved
    du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z = selective_scan_cuda.bwd(
        u, delta, A, B, C, D, z, delta_bias, dout, states, out, dz, True, True)
    return du, ddelta, dA, dB, dC, dD, ddelta_bias, out_z


SCAN = ScanKernel(_mamba_ssm_fwd, _mamba_ssm_bwd)


def _ext_fwd(u, delta, A, B, C, D, z, delta_bias):
    y, states = _ext().scan_fwd(u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias, True, None)
    return y, (states,)


def _ext_bwd(u, delta, A, B, C, D, z, delta_bias, saved, dout, dz):
    du, ddelta, dA, dB, dC, dD, ddelta_bias, _, _, out_z = _ext().scan_bwd(
        u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias, True, None, saved[0], dout, None, dz=dz, want_out_z=True)
    return du, ddelta, dA, dB[:, None], dC[:, None], dD, ddelta_bias, out_z


EXT_SCAN = ScanKernel(_ext_fwd, _ext_bwd)
INNER_SCANS = ("auto", "mamba_ssm", "cuda")


def inner_scan(u, N):
    """The scan of a call without prefill, from MAMBAPEFT_INNER_SCAN (read at each call, so that one process
    can compare them): "mamba_ssm" (SCAN), "cuda" (our CUDA scan, ops/scan_cuda_ext.py) or "auto" (the
    default): ours where its kernels along channels and states run both ways with 13 to 24 states (batch *
    channels >= 8192: forward + backward 1.36x mamba_ssm's speed at the 130m training shape, 1.52x at
    1.4b's; 1.35x at 22 states, Additional-scan's 16 + 6, where a channel's 4 threads hold 6 states each),
    mamba_ssm's elsewhere. Ours pays for 16 state slots from 9 states up, so at 8 states it took 1.00 ms to
    mamba_ssm's 0.69; below the threshold ours runs its block scans (bench/results/issue13/s7 to s10)."""
    name = os.environ.get("MAMBAPEFT_INNER_SCAN", "auto")
    if name not in INNER_SCANS:
        raise ValueError(f"MAMBAPEFT_INNER_SCAN={name!r}: expected one of {', '.join(INNER_SCANS)}")
    if name == "mamba_ssm" or (name == "auto" and not (
            12 < N <= 24 and _ext().available() and _ext().extension().lanes(u.shape[0], u.shape[1], N))):
        return SCAN
    if not _ext().available():
        raise ValueError("MAMBAPEFT_INNER_SCAN=cuda: our CUDA scan did not build (it needs CUDA and nvcc; "
                         "the log says why)")
    return EXT_SCAN


# ---- layout helpers ---------------------------------------------------------------------------
def is_flat(t):
    """(b, C, L) with (C, b*L) memory: strides (L, b*L, 1)."""
    b, _, L = t.shape
    return t.stride(2) == 1 and (t.shape[1] == 1 or t.stride(1) == b * L) and (b == 1 or t.stride(0) == L)


def flat(t):
    """t (b, C, L) in the flat layout: itself when it already is, else one copy."""
    if is_flat(t):
        return t
    return t.permute(1, 0, 2).contiguous().permute(1, 0, 2)


def _2d(t):
    """A flat (b, C, L) tensor as its (C, b*L) memory."""
    b, C, L = t.shape
    return t.permute(1, 0, 2).reshape(C, b * L)   # a view for flat tensors


def _3d(t2, b):
    """(C, b*L) -> (b, C, L) view (flat)."""
    return t2.view(t2.shape[0], b, -1).permute(1, 0, 2)


def _bc(rows, b):
    """(N, b*L) rows of x_proj's output -> the scan's (b, 1, N, L) view."""
    return _3d(rows, b).unsqueeze(1)


# ---- affix tokens as a prefill (a state handed on to the sequence's scan) -----------------------
def _triton():
    from . import scan_triton   # lazily: triton is optional, and its interpreter flag is read at import
    return scan_triton


def _carry():
    from . import scan_carry
    return scan_carry


def _ext():
    from . import scan_cuda_ext   # lazily: the extension is built on first use
    return scan_cuda_ext


PREFILL_MODES = ("cuda", "carry", "triton")


def _split(pre, u, delta, B, C, z):
    """pre = (pad, n): columns pad..n-1 are the tokens (the prefill), n.. the sequence; the first `pad`
    columns are zeros that only align the sequence's start (see mixer_cuda._prefix_width) and are not
    scanned. -> the prefill's and the sequence's (b, E|N, L) views."""
    pad, n = pre
    B3, C3 = B[:, 0], C[:, 0]
    tokens = (u[..., pad:n], delta[..., pad:n], B3[..., pad:n], C3[..., pad:n])
    main = (u[..., n:], delta[..., n:], B3[..., n:], C3[..., n:], z[..., n:])
    return tokens, main


def _prefill_fwd(mode, pre, u, delta, A, B, C, D, z, delta_bias):
    """Scan the tokens from zero (their outputs are not wanted: no D, no z), then the sequence from the
    state h they leave. mode "cuda": both on our CUDA scan (ops/scan_cuda_ext.py); "carry": the tokens
    on the Triton scan, the sequence on mamba_ssm's kernel from zero, plus h carried forward
    (ops/scan_carry.py); "triton": both on the Triton scan.
    -> the gated output of the sequence (b, E, L - n), flat, and what backward needs."""
    (tu, td, tB, tC), (mu, md, mB, mC, mz) = _split(pre, u, delta, B, C, z)
    if mode == "cuda":
        ext = _ext()
        h = ext.scan_fwd(tu, td, A, tB, tC, None, None, delta_bias, True, None, want_y=False)[1][:, :, -1]
        y, states = ext.scan_fwd(mu, md, A, mB, mC, D, mz, delta_bias, True, h)
        return y, (h, states)
    st = _triton()
    _, h = st.scan_fwd(tu, td, A, tB, tC, None, None, delta_bias, True, None)
    if mode == "triton":
        y, _ = st.scan_fwd(mu, md, A, mB, mC, D, mz, delta_bias, True, h)
        return y, (h,)
    n = pre[1]
    y0, states = selective_scan_cuda.fwd(mu, md, A, B[..., n:], C[..., n:], D, None, delta_bias, True)[:2]
    out = _3d(u.new_empty(u.shape[1], u.shape[0] * mu.shape[-1]), u.shape[0])
    carry = _carry()
    starts = carry.carry_starts(md, delta_bias)                     # kept for backward: (b, E, L / 64) floats
    return carry.carry_fwd(y0, mz, md, delta_bias, A, mC, h, out=out, starts=starts), (h, states, y0, starts)


def _prefill_bwd(mode, pre, u, delta, A, B, C, D, z, delta_bias, saved, dy, dz, want_out_z):
    """Gradients of the prefilled scan: the sequence's backward gives the gradient of the state h, which
    is the prefill's dlast. -> du, ddelta (b, E, L) flat, dA, dB, dC (b, 1, N, L) fp32, dD, ddelta_bias,
    out_z (or None); dz (b, E, L) is written: the sequence's gradient, zero on the prefix columns
    (their outputs were dropped), as are du, ddelta, dB and dC there except the tokens' own."""
    (tu, td, tB, tC), (mu, md, mB, mC, mz) = _split(pre, u, delta, B, C, z)
    pad, n = pre
    h = saved[0]
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    st = _triton() if mode != "cuda" else None
    if mode == "cuda":   # du, ddelta, dz written in place; the tokens are one chunk: h is their (only) state
        ext = _ext()
        _, _, dA, mdB, mdC, dD, dbias, dh, _, out_z = ext.scan_bwd(
            mu, md, A, mB, mC, D, mz, delta_bias, True, h, saved[1], dy, None, dz=dz[..., n:],
            want_out_z=want_out_z, du=du[..., n:], ddelta=ddelta[..., n:])
        _, _, tdA, tdB, tdC, _, tdbias, _, _, _ = ext.scan_bwd(
            tu, td, A, tB, tC, None, None, delta_bias, True, None, h[:, :, None], None, dh, du=du[..., pad:n],
            ddelta=ddelta[..., pad:n])
        mdu = mdd = tdu = tdd = None
    elif mode == "triton":
        mdu, mdd, dA, mdB, mdC, dD, mdz, dbias, dh = st.scan_bwd(mu, md, A, mB, mC, D, mz, delta_bias, True, h,
                                                                dy, None)
        dz[..., n:].copy_(mdz)
        out_z = st.scan_fwd(mu, md, A, mB, mC, D, mz, delta_bias, True, h)[0] if want_out_z else None
    else:
        _, states, y0, starts = saved
        carry = _carry()
        g, rest, dAc, dCc, dh, out_z = carry.carry_bwd_tiles(dy, y0, mz, md, delta_bias, A, mC, h, dz[..., n:],
                                                             want_out=want_out_z, starts=starts)
        mdu, mdd, dA, mdB, mdC, dD, dbias = selective_scan_cuda.bwd(
            mu, md, A, B[..., n:], C[..., n:], D, None, delta_bias, g, states, None, None, True, False)[:7]
        _, dbc = carry.carry_bwd_finish(rest, add=mdd, out=ddelta[..., n:])   # the sum, written in place
        mdd, dA, dbias = None, dA + dAc, dbias + dbc
        mdB, mdC = mdB[:, 0], dCc.add_(mdC[:, 0])
    dz[..., :n].zero_()
    if mode != "cuda":
        tdu, tdd, tdA, tdB, tdC, _, _, tdbias, _ = st.scan_bwd(tu, td, A, tB, tC, None, None, delta_bias, True,
                                                               None, None, dh)
    dB, dC = (torch.empty(B.shape, dtype=torch.float32, device=B.device) for _ in range(2))
    for full, tok, seq in ((du, tdu, mdu), (ddelta, tdd, mdd), (dB[:, 0], tdB, mdB), (dC[:, 0], tdC, mdC)):
        full[..., :pad].zero_()
        if tok is not None:
            full[..., pad:n].copy_(tok)
        if seq is not None:
            full[..., n:].copy_(seq)
    return du, ddelta, dA + tdA, dB, dC, dD, dbias + tdbias, out_z


class MambaInner(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_w, out_w, out_b, A, D, dt_b, out_extra, prefill=None,
                z_fn=None):
        with torch.autocast(xz.device.type, enabled=False):
            xz = flat(xz)
            dtype, b = xz.dtype, xz.shape[0]
            E, R = dt_w.shape
            cw = conv_w.contiguous()
            cb = conv_b.to(cw.dtype).contiguous() if conv_b is not None else None
            wx, wdt = x_proj_w.to(dtype), dt_w.to(dtype)
            wo = out_w.to(dtype) if out_extra is None else torch.cat([out_w.to(dtype), out_extra.to(dtype)])
            bo = out_b.to(dtype) if out_b is not None else None
            x, z = xz[:, :E], xz[:, E:]
            u = flat(conv_fwd(x, cw, cb, None, None, None, True))
            x_dbl = wx @ _2d(u)                                   # (R + 2N, bL)
            delta = _3d(wdt @ x_dbl[:R], b)                       # (b, E, L), flat
            N = (x_dbl.shape[0] - R) // 2
            B, C = _bc(x_dbl[R:R + N], b), _bc(x_dbl[R + N:], b)
            Ac, Df, dtbf = A.contiguous(), D.float().contiguous(), dt_b.float().contiguous()
            if prefill:   # affix tokens: a prefill, then the sequence's positions only (b, E, L - n)
                out_z, saved = _prefill_fwd(prefill[0], prefill[1:], u, delta, Ac, B, C, Df, z, dtbf)
            else:
                scan = inner_scan(u, N)
                out_z, saved = scan.forward(u, delta, Ac, B, C, Df, z, dtbf)
            y = _2d(flat(out_z)).t()                              # (b(L [- n]), E)
            if bo is not None:
                bias = bo if out_extra is None else torch.cat([bo, bo.new_zeros(out_extra.shape[0])])
                out = torch.addmm(bias, y, wo.t())
            else:
                out = y @ wo.t()
        # with z_fn, only x is kept (its own copy: a view would keep xz's whole storage) and z is made again
        ctx.save_for_backward(xz if z_fn is None else x.clone(), cw, cb, x_dbl, wx, wdt, wo, Ac, Df, dtbf, *saved)
        ctx.D_out, ctx.prefill, ctx.z_fn = out_w.shape[0], prefill, z_fn
        ctx.scan = None if prefill else scan
        ctx.dtypes = [t.dtype if t is not None else None for t in (conv_w, conv_b, x_proj_w, dt_w, out_w, out_b,
                                                                   A, D, dt_b, out_extra)]
        return out.view(b, -1, out.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        xz, cw, cb, x_dbl, wx, wdt, wo, A, Df, dtbf, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.autocast(xz.device.type, enabled=False):
            b, E, R = xz.shape[0], wdt.shape[0], wdt.shape[1]
            N = (x_dbl.shape[0] - R) // 2
            if ctx.z_fn is None:
                x, z = xz[:, :E], xz[:, E:]
                dxz = torch.empty_like(xz)                                  # flat, like xz
            else:
                x, z = xz, ctx.z_fn()
                dxz = _3d(x.new_empty(2 * E, b * x.shape[-1]), b)
            # recompute what the forward did not keep
            u = flat(conv_fwd(x, cw, cb, None, None, None, True))
            delta = _3d(wdt @ x_dbl[:R], b)
            B, C = _bc(x_dbl[R:R + N], b), _bc(x_dbl[R + N:], b)
            dout = dout.reshape(-1, dout.shape[-1]).to(x.dtype)        # (bL, D [+ extra])
            dx, dz = dxz[:, :E], dxz[:, E:]
            dy = _3d(wo.t() @ dout.t(), b)                              # (b, E, L [- n]), flat
            Dm, pre = ctx.D_out, ctx.prefill
            if pre:
                du, ddelta, dA, dB, dC, dD, ddt_b, out_z = _prefill_bwd(
                    pre[0], pre[1:], u, delta, A, B, C, Df, z, dtbf, saved, dy, dz, need[5] or need[10])
                y = _2d(flat(out_z)) if out_z is not None else None    # (E, b(L - n))
            else:
                du, ddelta, dA, dB, dC, dD, ddt_b, out_z = ctx.scan.backward(
                    u, delta, A, B, C, Df, z, dtbf, saved, dy, dz)
                if dz.data_ptr() != dxz[:, E:].data_ptr():              # a scan that allocated its own
                    dxz[:, E:].copy_(dz)
                y = _2d(out_z)                                          # (E, bL)
            d_out_w = dout[:, :Dm].t() @ y.t() if need[5] else None
            d_out_b = dout[:, :Dm].sum(0) if need[6] else None
            d_extra = dout[:, Dm:].t() @ y.t() if need[10] else None
            # x_proj's output gradient [d dt; dB; dC] as (R + 2N, bL) rows
            ddelta2 = _2d(flat(ddelta))
            dx_dbl = torch.empty_like(x_dbl)
            torch.mm(wdt.t(), ddelta2, out=dx_dbl[:R])
            dx_dbl[R:R + N].view(N, b, -1).copy_(dB[:, 0].permute(1, 0, 2))
            dx_dbl[R + N:].view(N, b, -1).copy_(dC[:, 0].permute(1, 0, 2))
            d_dt_w = ddelta2 @ x_dbl[:R].t() if need[4] else None
            du2 = _2d(flat(du))
            d_x_proj = dx_dbl @ _2d(u).t() if need[3] else None
            du2.addmm_(wx.t(), dx_dbl)                                   # u's gradient, in place
            _, d_conv_w, d_conv_b, _ = conv_bwd(x, cw, cb, _3d(du2, b), None, None, None, dx, False, True)
        grads = [dxz, d_conv_w if need[1] else None, d_conv_b if need[2] else None, d_x_proj, d_dt_w,
                 d_out_w, d_out_b, dA if need[7] else None, dD if need[8] else None,
                 ddt_b if need[9] else None, d_extra]
        return tuple([grads[0]] + [g.to(dt) if g is not None else None for g, dt in zip(grads[1:], ctx.dtypes)]
                     + [None, None])


def mamba_inner(xz, conv_w, conv_b, x_proj_w, dt_w, out_w, out_b, A, D, dt_b, out_extra=None, prefill=None,
                z_fn=None):
    """xz (b, 2E, L) -> out_proj(gated scan) (b, L, D [+ rows of out_extra]).

    conv_w (E, k), conv_b (E,) or None, x_proj_w (R + 2N, E), dt_w (E, R), out_w (D, E), out_b (D,)
    or None, A (E, N) fp32 (= -exp(A_log)), D and dt_b (E,), out_extra (r, E) or None. Computes in
    xz's dtype (bf16 under autocast), with the scan state and A, D, dt_b in fp32.

    prefill = (mode, pad, n): the first n columns of xz are a prefix whose outputs are not wanted: `pad`
    zero columns (they align the sequence's start for mamba_ssm's vectorised loads; never scanned),
    then affix tokens. The tokens feed the conv windows, and the scan over them is a prefill whose last
    state, carrying gradient, the sequence continues from: mode "cuda" scans both on our CUDA scan,
    "carry" scans the sequence with mamba_ssm's kernel from zero and adds that state carried forward
    (ops/scan_carry.py), "triton" scans both on the Triton scan. The output is then (b, L - n, D [+ extra])
    and the prefix's z columns get a zero gradient.

    z_fn: a function that makes xz's z half (b, E, L), time contiguous, again, equal to the forward's:
    backward then keeps only a copy of the x half, half of xz (67 MB a layer at the mamba-1.4b shape,
    4 x 2048 tokens), for the cost of recomputing z (an in_proj product of E rows)."""
    if prefill is not None and prefill[0] not in PREFILL_MODES:
        raise ValueError(f"prefill mode {prefill[0]!r}: expected one of {PREFILL_MODES}")
    if z_fn is not None and prefill is not None:
        raise ValueError("z_fn with a prefill: the prefix's z columns would have to be made again too")
    return MambaInner.apply(xz, conv_w, conv_b, x_proj_w, dt_w, out_w, out_b, A, D, dt_b, out_extra, prefill, z_fn)

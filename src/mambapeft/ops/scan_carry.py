"""An initial state's share of a selective scan's output, in Triton: what lets mamba_ssm's scan (which
takes no initial state) run a sequence that continues from one.

The scan is linear in its state, so a scan from h0 is the scan from zero plus h0 carried forward:

    h_t = a_t h_{t-1} + x_t,  a_t = exp(dt_t A)   =>   y_t = y0_t + sum_n C_nt exp(A_n cs_t) h0_n,

with y0 the output from the zero state, cs_t = dt_1 + ... + dt_t the cumulative step (per channel) and
dt = softplus(delta + bias). The carried term has no recurrence: every (b, e, t) is independent
once cs is known (on the H200 this kernel's backward still takes about 0.9 ms a layer at
8 x 1536 x 1024, as long as mamba_ssm's scan backward). `carry_fwd` adds it to y0 and applies the gate,
`carry_bwd` gives the gradients of the gated output for y0 (for the zero-state scan's own backward),
z, delta, A, C and h0.

Affix tuning uses it: the affix tokens are a short prefill (ops/scan_triton.py) whose last state the
sequence continues from, while the sequence itself runs on mamba_ssm's 1024-position template instead
of 1024 + n positions on its 2048 one (ops/mamba_inner.py).

Layout: one program per (block of BLOCK_E channels, batch row), time in tiles of BLOCK_T, a loop over
the N states. (All N states of a tile at once, as (BLOCK_E, N, BLOCK_T) tensors, measured 2.5x slower
on the H200; the backward's per-state reductions over time and channels are what limits this one.)
The backward walks the tiles in reverse (cs from a first pass's total), so the reverse cumulative sum
that turns d/d(cs) into d/d(dt) is a running carry, as the forward's cs is. dC sums over channels,
which span programs: per-program partials (b, E / BLOCK_E, N, L) that torch adds.
Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (set before import), like scan_triton.
"""
import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
BLOCK_E, BLOCK_T, WARPS = 32, 64, 4


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _load(ptr, offs_e, s_e, tt, mask):
    return tl.load(ptr + offs_e[:, None] * s_e + tt[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(y0_ptr, z_ptr, delta_ptr, bias_ptr, A_ptr, C_ptr, h0_ptr, out_ptr,
                E, N, L, s_yb, s_ye, s_zb, s_ze, s_db, s_de, s_Cb, s_Cn, s_ob, s_oe,
                BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_e, b = tl.program_id(0), tl.program_id(1)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_t = tl.arange(0, BLOCK_T)
    me = offs_e < E
    bias = tl.load(bias_ptr + offs_e, mask=me, other=0.0)
    cs_in = tl.zeros([BLOCK_E], dtype=tl.float32)             # cumulative step before this tile
    t0 = 0
    while t0 < L:
        tt = t0 + offs_t
        mt = tt < L
        m2 = me[:, None] & mt[None, :]
        dt = tl.where(m2, _softplus(_load(delta_ptr + b * s_db, offs_e, s_de, tt, m2) + bias[:, None]), 0.0)
        cs = cs_in[:, None] + tl.cumsum(dt, axis=1)
        cs_in += tl.sum(dt, axis=1)
        acc = _load(y0_ptr + b * s_yb, offs_e, s_ye, tt, m2)
        n = 0
        while n < N:
            A2 = tl.load(A_ptr + offs_e * N + n, mask=me, other=0.0) * LOG2E
            h = tl.load(h0_ptr + (b * E + offs_e) * N + n, mask=me, other=0.0)
            C = tl.load(C_ptr + b * s_Cb + n * s_Cn + tt, mask=mt, other=0.0).to(tl.float32)
            acc += C[None, :] * tl.exp2(A2[:, None] * cs) * h[:, None]
            n += 1
        z = _load(z_ptr + b * s_zb, offs_e, s_ze, tt, m2)
        out = acc * z / (1.0 + tl.exp(-z))
        tl.store(out_ptr + b * s_ob + offs_e[:, None] * s_oe + tt[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)
        t0 += BLOCK_T


@triton.jit
def _bwd_kernel(dout_ptr, y0_ptr, z_ptr, delta_ptr, bias_ptr, A_ptr, C_ptr, h0_ptr,
                g_ptr, dz_ptr, ddelta_ptr, dC_ptr, dA_ptr, dh0_ptr, dbias_ptr, out_ptr,
                E, N, L, s_ob, s_oe, s_yb, s_ye, s_zb, s_ze, s_db, s_de, s_Cb, s_Cn,
                s_gb, s_ge, s_dzb, s_dze, s_xb, s_xe,
                WRITE_OUT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_e, b = tl.program_id(0), tl.program_id(1)
    n_eb = tl.num_programs(0)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    me = offs_e < E
    bias = tl.load(bias_ptr + offs_e, mask=me, other=0.0)
    n_tiles = tl.cdiv(L, BLOCK_T)
    total = tl.zeros([BLOCK_E], dtype=tl.float32)            # cs at the last step
    i = 0
    while i < n_tiles:
        tt = i * BLOCK_T + offs_t
        m2 = me[:, None] & (tt < L)[None, :]
        total += tl.sum(tl.where(m2, _softplus(_load(delta_ptr + b * s_db, offs_e, s_de, tt, m2) + bias[:, None]),
                                 0.0), axis=1)
        i += 1
    later = tl.zeros([BLOCK_E], dtype=tl.float32)            # steps after the current tile
    dlater = tl.zeros([BLOCK_E], dtype=tl.float32)           # d/d(cs) summed over steps after the tile
    dh0 = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    dA = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_E], dtype=tl.float32)
    dC_ptr += (b * n_eb + pid_e) * N * L
    i = n_tiles - 1
    while i >= 0:
        tt = i * BLOCK_T + offs_t
        mt = tt < L
        m2 = me[:, None] & mt[None, :]
        raw = _load(delta_ptr + b * s_db, offs_e, s_de, tt, m2) + bias[:, None]
        dt = tl.where(m2, _softplus(raw), 0.0)
        cs = total[:, None] - later[:, None] - (tl.cumsum(dt, axis=1, reverse=True) - dt)
        later += tl.sum(dt, axis=1)
        do = _load(dout_ptr + b * s_ob, offs_e, s_oe, tt, m2)
        z = _load(z_ptr + b * s_zb, offs_e, s_ze, tt, m2)
        sz = 1.0 / (1.0 + tl.exp(-z))
        g = do * z * sz                                       # d/d(ungated output)
        pre = _load(y0_ptr + b * s_yb, offs_e, s_ye, tt, m2)
        dcs = tl.zeros([BLOCK_E, BLOCK_T], dtype=tl.float32)
        n = 0
        while n < N:
            A = tl.load(A_ptr + offs_e * N + n, mask=me, other=0.0)
            h = tl.load(h0_ptr + (b * E + offs_e) * N + n, mask=me, other=0.0)
            C = tl.load(C_ptr + b * s_Cb + n * s_Cn + tt, mask=mt, other=0.0).to(tl.float32)
            decay = tl.exp2(A[:, None] * LOG2E * cs)
            gd = g * decay
            term = C[None, :] * decay * h[:, None]
            pre += term
            gterm = g * term
            dcs += A[:, None] * gterm
            col = offs_n[None, :] == n
            dh0 += tl.where(col, tl.sum(gd * C[None, :], axis=1)[:, None], 0.0)
            dA += tl.where(col, tl.sum(gterm * cs, axis=1)[:, None], 0.0)
            tl.store(dC_ptr + n * L + tt, tl.sum(gd * h[:, None], axis=0), mask=mt)
            n += 1
        tl.store(g_ptr + b * s_gb + offs_e[:, None] * s_ge + tt[None, :], g.to(g_ptr.dtype.element_ty), mask=m2)
        dz = do * pre * sz * (1.0 + z * (1.0 - sz))
        tl.store(dz_ptr + b * s_dzb + offs_e[:, None] * s_dze + tt[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
        if WRITE_OUT:
            tl.store(out_ptr + b * s_gb + offs_e[:, None] * s_ge + tt[None, :],
                     (pre * z * sz).to(out_ptr.dtype.element_ty), mask=m2)
        # d/d(dt_t) = sum over s >= t of d/d(cs_s); through softplus: times sigmoid(raw)
        ddt = (dlater[:, None] + tl.cumsum(dcs, axis=1, reverse=True)) / (1.0 + tl.exp(-raw))
        ddt = tl.where(m2, ddt, 0.0)
        dlater += tl.sum(dcs, axis=1)
        dbias += tl.sum(ddt, axis=1)
        tl.store(ddelta_ptr + b * s_xb + offs_e[:, None] * s_xe + tt[None, :], ddt, mask=m2)
        i -= 1
    men = me[:, None] & (offs_n < N)[None, :]
    en = offs_e[:, None] * N + offs_n[None, :]
    tl.store(dh0_ptr + b * E * N + en, dh0, mask=men)
    tl.store(dA_ptr + b * E * N + en, dA, mask=men)
    tl.store(dbias_ptr + b * E + offs_e, dbias, mask=me)


def _grid(y0):
    return (triton.cdiv(y0.shape[1], BLOCK_E), y0.shape[0])


def _check(*ts):
    for t in ts:
        assert t.stride(-1) == 1, f"time must be contiguous, got strides {t.stride()}"


def carry_fwd(y0, z, delta, delta_bias, A, C, h0, out=None):
    """(y0 + h0's share) * silu(z) -> out (b, E, L) in y0's dtype (written into `out` when given).

    y0, z, delta (b, E, L) with time contiguous (other strides free); delta_bias (E,), A (E, N) and
    h0 (b, E, N) fp32 contiguous; C (b, N, L), time contiguous. Softplus on delta + delta_bias."""
    _check(y0, z, delta, C, *(() if out is None else (out,)))
    b, E, L = y0.shape
    out = torch.empty_like(y0) if out is None else out
    _fwd_kernel[_grid(y0)](
        y0, z, delta, delta_bias, A, C, h0, out, E, A.shape[1], L,
        y0.stride(0), y0.stride(1), z.stride(0), z.stride(1), delta.stride(0), delta.stride(1),
        C.stride(0), C.stride(1), out.stride(0), out.stride(1), BLOCK_E=BLOCK_E, BLOCK_T=BLOCK_T, num_warps=WARPS)
    return out


def carry_bwd(dout, y0, z, delta, delta_bias, A, C, h0, dz, g=None, want_out=False):
    """Gradients of out = carry_fwd(...) given dout (b, E, L):
    -> g (d/dy0, in y0's dtype; the zero-state scan's dout), ddelta (fp32, (b, E, L)), dA (E, N),
    dC (b, N, L), dh0 (b, E, N), ddelta_bias (E,) all fp32, and out recomputed (or None).
    dz (b, E, L), time contiguous, is written in place; `g` may be a buffer to write g into."""
    g = torch.empty_like(y0) if g is None else g
    _check(dout, y0, z, delta, C, dz, g)
    b, E, L = y0.shape
    N = A.shape[1]
    f32 = {"dtype": torch.float32, "device": y0.device}
    n_eb = triton.cdiv(E, BLOCK_E)
    ddelta = torch.empty(b, E, L, **f32)
    dC_part = torch.empty(b, n_eb, N, L, **f32)
    dA_part, dh0 = torch.empty(2, b, E, N, **f32)
    dbias_part = torch.empty(b, E, **f32)
    out = torch.empty_like(g) if want_out else g
    _bwd_kernel[_grid(y0)](
        dout, y0, z, delta, delta_bias, A, C, h0, g, dz, ddelta, dC_part, dA_part, dh0, dbias_part, out,
        E, N, L, dout.stride(0), dout.stride(1), y0.stride(0), y0.stride(1), z.stride(0), z.stride(1),
        delta.stride(0), delta.stride(1), C.stride(0), C.stride(1), g.stride(0), g.stride(1),
        dz.stride(0), dz.stride(1), ddelta.stride(0), ddelta.stride(1),
        WRITE_OUT=want_out, BLOCK_E=BLOCK_E, BLOCK_N=triton.next_power_of_2(N), BLOCK_T=BLOCK_T, num_warps=WARPS)
    return g, ddelta, dA_part.sum(0), dC_part.sum(1), dh0, dbias_part.sum(0), out if want_out else None

"""An initial state's share of a selective scan's output, in Triton: what lets mamba_ssm's scan (which
takes no initial state) run a sequence that continues from one.

The scan is linear in its state, so a scan from h0 is the scan from zero plus h0 carried forward:

    h_t = a_t h_{t-1} + x_t,  a_t = exp(dt_t A)   =>   y_t = y0_t + sum_n C_nt exp(A_n cs_t) h0_n,

with y0 the output from the zero state, cs_t = dt_1 + ... + dt_t the cumulative step (per channel) and
dt = softplus(delta + bias). The carried term has no recurrence: every (b, e, t) is independent
once cs is known. `carry_fwd` adds it to y0 and applies the gate, `carry_bwd` gives the gradients of
the gated output for y0 (for the zero-state scan's own backward), z, delta, A, C and h0.

Affix tuning uses it: the affix tokens are a short prefill (ops/scan_triton.py) whose last state the
sequence continues from, while the sequence itself runs on mamba_ssm's 1024-position template instead
of 1024 + n positions on its 2048 one (ops/mamba_inner.py).

Layout: one program per tile of (BLOCK_E channels, BLOCK_T steps, batch row), a loop over the N
states inside. The only dependencies along time are the cumulative sums, each done within a tile plus
a per-tile offset: a first kernel walks the tiles' sums of dt for each tile's starting cs, and the
backward's reverse cumulative sum of d/d(cs) (which is d/d(dt)) is finished by a last kernel that adds
the later tiles' totals. Sums over programs (dC over channels, dh0 and dA over time) go to
per-program partials that torch adds. Small tiles on one warp measured fastest: the reductions stay
inside the warp. On the H200 (bench/bench_carry_gpu.py, results in bench/results/issue13/s3_carry) the
backward takes 0.54 ms at 8 x 1536 x 1024 (0.6x mamba_ssm's scan backward there) and 1.17 ms at
4 x 4096 x 2048 (0.5x); one program walking all of time for its channels took 0.96 and 1.85 ms. Per
(channel, state, step) it makes an exp and three sums, about what the scan itself does.
Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (set before import), like scan_triton.
"""
import torch
import triton
import triton.language as tl

from . import device_of
from .scan_triton import LOG2E, softplus

BLOCK_E, BLOCK_T, WARPS = 8, 64, 1   # the fastest of those measured on the H200 (bench_carry_gpu.py)


@triton.jit
def _tile(ptr, b, offs_e, tt, s_b, s_e):
    """Pointers to a (channels, steps) tile of a (b, E, L) tensor with time contiguous."""
    return ptr + b * s_b + offs_e[:, None] * s_e + tt[None, :]


@triton.jit
def _coords(E, L, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's tile: (block of channels, block of steps, batch row) = program ids (0, 1, 2)."""
    pid_e, i, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    tt = i * BLOCK_T + tl.arange(0, BLOCK_T)
    me, mt = offs_e < E, tt < L
    return pid_e, i, b, offs_e, tt, me, mt, me[:, None] & mt[None, :]


@triton.jit
def _dt(delta_ptr, bias_ptr, b, offs_e, tt, me, m2, s_db, s_de):
    """-> raw = delta + bias and dt = softplus(raw) of a tile, dt zero outside (E, L)."""
    bias = tl.load(bias_ptr + offs_e, mask=me, other=0.0)
    raw = tl.load(_tile(delta_ptr, b, offs_e, tt, s_db, s_de), mask=m2, other=0.0).to(tl.float32) + bias[:, None]
    return raw, tl.where(m2, softplus(raw), 0.0)


@triton.jit
def _starts_kernel(delta_ptr, bias_ptr, starts_ptr, E, L, n_tb, s_db, s_de,
                   BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, WALK: tl.constexpr):
    """starts (b, E, tiles): the cumulative step before each tile. One program per (channels, batch row)
    walks the tiles, WALK at a time: a running sum, cheap next to the tiles' own work."""
    pid_e, b = tl.program_id(0), tl.program_id(1)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    me = offs_e < E
    w = tl.arange(0, WALK)
    run = tl.zeros([BLOCK_E], dtype=tl.float32)
    i = 0
    while i < n_tb:
        tt = i * BLOCK_T + tl.arange(0, WALK * BLOCK_T)
        _, dt = _dt(delta_ptr, bias_ptr, b, offs_e, tt, me, me[:, None] & (tt < L)[None, :], s_db, s_de)
        sums = tl.sum(tl.reshape(dt, [BLOCK_E, WALK, BLOCK_T]), axis=2)            # (channels, WALK tiles)
        mw = me[:, None] & (i + w < n_tb)[None, :]
        tl.store(starts_ptr + (b * E + offs_e[:, None]) * n_tb + i + w[None, :],
                 run[:, None] + tl.cumsum(sums, axis=1) - sums, mask=mw)
        run += tl.sum(sums, axis=1)
        i += WALK


@triton.jit
def _cs(delta_ptr, bias_ptr, starts_ptr, E, L, s_db, s_de, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """-> raw, and cs (the cumulative step from the sequence's start) of this program's tile."""
    _, i, b, offs_e, tt, me, _, m2 = _coords(E, L, BLOCK_E, BLOCK_T)
    raw, dt = _dt(delta_ptr, bias_ptr, b, offs_e, tt, me, m2, s_db, s_de)
    start = tl.load(starts_ptr + (b * E + offs_e) * tl.num_programs(1) + i, mask=me, other=0.0)
    return raw, start[:, None] + tl.cumsum(dt, axis=1)


@triton.jit
def _fwd_kernel(y0_ptr, z_ptr, delta_ptr, bias_ptr, starts_ptr, A_ptr, C_ptr, h0_ptr, out_ptr,
                E, N, L, s_yb, s_ye, s_zb, s_ze, s_db, s_de, s_Cb, s_Cn, s_ob, s_oe,
                BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    _, _, b, offs_e, tt, me, mt, m2 = _coords(E, L, BLOCK_E, BLOCK_T)
    _, cs = _cs(delta_ptr, bias_ptr, starts_ptr, E, L, s_db, s_de, BLOCK_E, BLOCK_T)
    acc = tl.load(_tile(y0_ptr, b, offs_e, tt, s_yb, s_ye), mask=m2, other=0.0).to(tl.float32)
    n = 0
    while n < N:
        A2 = tl.load(A_ptr + offs_e * N + n, mask=me, other=0.0) * LOG2E
        h = tl.load(h0_ptr + (b * E + offs_e) * N + n, mask=me, other=0.0)
        C = tl.load(C_ptr + b * s_Cb + n * s_Cn + tt, mask=mt, other=0.0).to(tl.float32)
        acc += C[None, :] * tl.exp2(A2[:, None] * cs) * h[:, None]
        n += 1
    z = tl.load(_tile(z_ptr, b, offs_e, tt, s_zb, s_ze), mask=m2, other=0.0).to(tl.float32)
    out = acc * z / (1.0 + tl.exp(-z))
    tl.store(_tile(out_ptr, b, offs_e, tt, s_ob, s_oe), out.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _bwd_kernel(dout_ptr, y0_ptr, z_ptr, delta_ptr, bias_ptr, starts_ptr, A_ptr, C_ptr, h0_ptr,
                g_ptr, dz_ptr, ddelta_ptr, dC_ptr, dA_ptr, dh0_ptr, totals_ptr, out_ptr,
                E, N, L, s_ob, s_oe, s_yb, s_ye, s_zb, s_ze, s_db, s_de, s_Cb, s_Cn,
                s_gb, s_ge, s_dzb, s_dze,
                WRITE_OUT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_e, i, b, offs_e, tt, me, mt, m2 = _coords(E, L, BLOCK_E, BLOCK_T)
    n_tb = tl.num_programs(1)
    raw, cs = _cs(delta_ptr, bias_ptr, starts_ptr, E, L, s_db, s_de, BLOCK_E, BLOCK_T)
    do = tl.load(_tile(dout_ptr, b, offs_e, tt, s_ob, s_oe), mask=m2, other=0.0).to(tl.float32)
    z = tl.load(_tile(z_ptr, b, offs_e, tt, s_zb, s_ze), mask=m2, other=0.0).to(tl.float32)
    sz = 1.0 / (1.0 + tl.exp(-z))
    g = do * z * sz                                           # d/d(ungated output)
    pre = tl.load(_tile(y0_ptr, b, offs_e, tt, s_yb, s_ye), mask=m2, other=0.0).to(tl.float32)
    dcs = tl.zeros([BLOCK_E, BLOCK_T], dtype=tl.float32)
    dC_ptr += (b * tl.num_programs(0) + pid_e) * N * L
    en = ((b * n_tb + i) * E + offs_e) * N                    # this program's rows of the dh0 and dA partials
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
        tl.store(dh0_ptr + en + n, tl.sum(gd * C[None, :], axis=1), mask=me)
        tl.store(dA_ptr + en + n, tl.sum(gterm * cs, axis=1), mask=me)
        tl.store(dC_ptr + n * L + tt, tl.sum(gd * h[:, None], axis=0), mask=mt)
        n += 1
    tl.store(_tile(g_ptr, b, offs_e, tt, s_gb, s_ge), g.to(g_ptr.dtype.element_ty), mask=m2)
    dz = do * pre * sz * (1.0 + z * (1.0 - sz))
    tl.store(_tile(dz_ptr, b, offs_e, tt, s_dzb, s_dze), dz.to(dz_ptr.dtype.element_ty), mask=m2)
    if WRITE_OUT:
        tl.store(_tile(out_ptr, b, offs_e, tt, s_gb, s_ge), (pre * z * sz).to(out_ptr.dtype.element_ty), mask=m2)
    # d/d(dt_t) = (sum over s >= t of d/d(cs_s)) * sigmoid(raw_t): here the sum over this tile's steps;
    # _later_kernel adds the later tiles' totals
    part = tl.cumsum(dcs, axis=1, reverse=True) / (1.0 + tl.exp(-raw))
    tl.store(_tile(ddelta_ptr, b, offs_e, tt, E * L, L), part, mask=m2)
    tl.store(totals_ptr + (b * E + offs_e) * n_tb + i, tl.sum(dcs, axis=1), mask=me)


@triton.jit
def _later_kernel(delta_ptr, bias_ptr, totals_ptr, part_ptr, add_ptr, out_ptr, dbias_ptr, E, L, s_db, s_de,
                  s_ab, s_ae, s_ob, s_oe, HAS_ADD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                  TILES: tl.constexpr):
    _, i, b, offs_e, tt, me, _, m2 = _coords(E, L, BLOCK_E, BLOCK_T)
    n_tb = tl.num_programs(1)
    raw, _ = _dt(delta_ptr, bias_ptr, b, offs_e, tt, me, m2, s_db, s_de)
    j = tl.arange(0, TILES)
    later = tl.sum(tl.load(totals_ptr + (b * E + offs_e[:, None]) * n_tb + j[None, :],
                           mask=me[:, None] & (j > i)[None, :] & (j < n_tb)[None, :], other=0.0), axis=1)
    part = tl.load(_tile(part_ptr, b, offs_e, tt, E * L, L), mask=m2, other=0.0)
    ddt = tl.where(m2, part + later[:, None] / (1.0 + tl.exp(-raw)), 0.0)
    tl.store(dbias_ptr + (b * n_tb + i) * E + offs_e, tl.sum(ddt, axis=1), mask=me)
    if HAS_ADD:
        ddt += tl.load(_tile(add_ptr, b, offs_e, tt, s_ab, s_ae), mask=m2, other=0.0).to(tl.float32)
    tl.store(_tile(out_ptr, b, offs_e, tt, s_ob, s_oe), ddt.to(out_ptr.dtype.element_ty), mask=m2)


def _grid(y0):
    b, E, L = y0.shape
    return (triton.cdiv(E, BLOCK_E), triton.cdiv(L, BLOCK_T), b)


def _check(*ts):
    for t in ts:
        assert t.stride(-1) == 1, f"time must be contiguous, got strides {t.stride()}"


def carry_starts(delta, delta_bias):
    """Each time tile's cumulative step before its first step, (b, E, tiles) fp32: what carry_fwd and
    carry_bwd compute first; pass it to both to compute it once."""
    b, E, L = delta.shape
    grid = _grid(delta)
    starts = torch.empty(b, E, grid[1], dtype=torch.float32, device=delta.device)
    with device_of(delta):
        _starts_kernel[(triton.cdiv(E, 8), b)](delta, delta_bias, starts, E, L, grid[1], delta.stride(0),
                                               delta.stride(1), BLOCK_E=8, BLOCK_T=BLOCK_T, WALK=4, num_warps=2)
    return starts


def carry_fwd(y0, z, delta, delta_bias, A, C, h0, out=None, starts=None):
    """(y0 + h0's share) * silu(z) -> out (b, E, L) in y0's dtype (written into `out` when given).

    y0, z, delta (b, E, L) with time contiguous (other strides free); delta_bias (E,), A (E, N) and
    h0 (b, E, N) fp32 contiguous; C (b, N, L), time contiguous. Softplus on delta + delta_bias.
    starts: carry_starts(delta, delta_bias), computed here when not given."""
    _check(y0, z, delta, C, *(() if out is None else (out,)))
    b, E, L = y0.shape
    out = torch.empty_like(y0) if out is None else out
    starts = carry_starts(delta, delta_bias) if starts is None else starts
    with device_of(y0):
        _fwd_kernel[_grid(y0)](
            y0, z, delta, delta_bias, starts, A, C, h0, out, E, A.shape[1], L,
            y0.stride(0), y0.stride(1), z.stride(0), z.stride(1), delta.stride(0), delta.stride(1),
            C.stride(0), C.stride(1), out.stride(0), out.stride(1), BLOCK_E=BLOCK_E, BLOCK_T=BLOCK_T, num_warps=WARPS)
    return out


def carry_bwd(dout, y0, z, delta, delta_bias, A, C, h0, dz, g=None, want_out=False, starts=None):
    """Gradients of out = carry_fwd(...) given dout (b, E, L):
    -> g (d/dy0, in y0's dtype; the zero-state scan's dout), ddelta (fp32, (b, E, L)), dA (E, N),
    dC (b, N, L), dh0 (b, E, N), ddelta_bias (E,) all fp32, and out recomputed (or None).
    dz (b, E, L), time contiguous, is written in place; `g` may be a buffer to write g into."""
    g, rest, dA, dC, dh0, out = carry_bwd_tiles(dout, y0, z, delta, delta_bias, A, C, h0, dz, g, want_out, starts)
    ddelta, dbias = carry_bwd_finish(rest)
    return g, ddelta, dA, dC, dh0, dbias, out


def carry_bwd_tiles(dout, y0, z, delta, delta_bias, A, C, h0, dz, g=None, want_out=False, starts=None):
    """carry_bwd in two parts, so that the zero-state scan's backward (which needs g) can run between
    them and carry_bwd_finish add its d/d(delta) in the same pass: -> g, `rest` for carry_bwd_finish,
    dA, dC, dh0, out."""
    g = torch.empty_like(y0) if g is None else g
    _check(dout, y0, z, delta, C, dz, g)
    b, E, L = y0.shape
    N = A.shape[1]
    grid = _grid(y0)
    f32 = {"dtype": torch.float32, "device": y0.device}
    part = torch.empty(b, E, L, **f32)
    dC_part = torch.empty(b, grid[0], N, L, **f32)
    dh0_part, dA_part = torch.empty(2, b, grid[1], E, N, **f32)
    totals = torch.empty(b, E, grid[1], **f32)
    out = torch.empty_like(g) if want_out else g
    starts = carry_starts(delta, delta_bias) if starts is None else starts
    with device_of(y0):
        _bwd_kernel[grid](
            dout, y0, z, delta, delta_bias, starts, A, C, h0, g, dz, part, dC_part,
            dA_part, dh0_part, totals, out, E, N, L, dout.stride(0), dout.stride(1), y0.stride(0), y0.stride(1),
            z.stride(0), z.stride(1), delta.stride(0), delta.stride(1), C.stride(0), C.stride(1),
            g.stride(0), g.stride(1), dz.stride(0), dz.stride(1),
            WRITE_OUT=want_out, BLOCK_E=BLOCK_E, BLOCK_T=BLOCK_T, num_warps=WARPS)
    rest = (delta, delta_bias, totals, part, grid)
    return g, rest, dA_part.sum((0, 1)), dC_part.sum(1), dh0_part.sum(1), out if want_out else None


def carry_bwd_finish(rest, add=None, out=None):
    """-> d/d(delta) plus `add` (e.g. the zero-state scan's d/d(delta)), written into `out` (b, E, L) of
    any float dtype, time contiguous (default: fp32, new), and ddelta_bias (the carry's share only)."""
    delta, delta_bias, totals, part, grid = rest
    b, E, L = part.shape
    out = part if out is None else out          # each element is read before it is written: in place is safe
    _check(out, *(() if add is None else (add,)))
    a = part if add is None else add
    dbias_part = torch.empty(b, grid[1], E, dtype=torch.float32, device=part.device)
    with device_of(part):
        _later_kernel[grid](delta, delta_bias, totals, part, a, out, dbias_part, E, L, delta.stride(0), delta.stride(1),
                            a.stride(0), a.stride(1), out.stride(0), out.stride(1), HAS_ADD=add is not None,
                            BLOCK_E=BLOCK_E, BLOCK_T=BLOCK_T, TILES=triton.next_power_of_2(grid[1]), num_warps=WARPS)
    return out, dbias_part.sum((0, 1))

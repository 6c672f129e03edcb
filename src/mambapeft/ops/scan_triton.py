"""The selective scan in Triton: forward and backward, with an initial state and a last state that both
carry gradient.

Same call and semantics as every backend (see scan_ref.py): u, delta, z (b, E, L); A (E, N) real;
B, C (b, N, L) (one group); D, delta_bias (E,); initial_state and the last state (b, E, N) fp32.
Inputs in bf16/fp16/fp32, state and sums in fp32, y in u's dtype, each gradient in its input's dtype.

Why it exists: mamba_ssm's kernel takes no initial state, and its length templates make 1024 + 3 affix
tokens cost as much as 2048. Here the affix tokens can be a prefill whose (differentiable) last state
starts the main scan, and a length one past a tile costs one tile more, not a second template.

Layout (one program per (block of BLOCK_E channels, batch row)):
- the state h (BLOCK_E, N) stays in registers; time runs in tiles of BLOCK_T steps, loaded as
  (BLOCK_E, BLOCK_T) / (N, BLOCK_T) tiles along the contiguous time axis;
- inside a tile the recurrence h_t = a_t h_{t-1} + x_t (a_t = exp(dt_t A), x_t = dt_t u_t B_t) is a
  `tl.associative_scan` over time of the affine maps (a, x), then h_t = P_t h_in + H_t;
- backward reruns the forward kernel to store the state entering every tile (b, tiles, E, N) fp32,
  a transient buffer like mamba_ssm's recomputation (nothing but the inputs is kept between forward
  and backward), then walks the tiles in reverse: recompute the tile's states, reverse-scan
  dh_t = C_t dy_t + a_{t+1} dh_{t+1}, and form the gradients. a_t h_{t-1} = h_t - x_t, so no division.
- dB and dC sum over channels, which span programs: each program writes its block's partial sums
  (b, E / BLOCK_E, N, L) fp32 and torch adds them (deterministic, no atomics). dA, dD and the delta
  bias gradient are per-program (b, E, ...) partials summed over the batch in torch.

Entry points: `selective_scan_triton` (the backend call, autograd), and `prepare` + `scan_fwd` +
`scan_bwd` without autograd, for a fused autograd Function that runs the scan inside its own forward
and backward (as mamba_inner_fn does with selective_scan_cuda.fwd / .bwd).

Block sizes come from `config()` (by shape); bench/bench_scan_gpu.py --triton-sweep measures others.
Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before this module is imported;
that is how the tests run without a GPU).
"""
import os
from collections import namedtuple

import torch
import triton
import triton.language as tl

from . import device_of
from .scan_common import input_grads, keep_dtypes

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)): A is scaled once
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

Config = namedtuple("Config", "fwd_e fwd_warps bwd_e bwd_warps t")
OVERRIDE = None  # a Config to force (the benchmark's sweep); None: config() by shape


def config(E, L, N):
    """Block sizes by shape. BLOCK_T = t is shared by forward and backward: the backward's state buffer
    has one entry per tile. Registers hold several (BLOCK_E, N, BLOCK_T) fp32 tiles, hence the small
    blocks when N is large."""
    if OVERRIDE is not None:
        return OVERRIDE
    n = triton.next_power_of_2(N)
    t = 32 if L >= 32 else max(4, triton.next_power_of_2(L))  # tiles of at least 4 steps (tl.arange)
    # about 32 fp32 per thread per (BLOCK_E, N, BLOCK_T) tile in forward (5 such tiles live), 16 in
    # backward (about 10 live); not below 8 channels in backward: the dB/dC partials are E / BLOCK_E
    # copies of (b, N, L)
    fwd_e = max(2, min(8, 128 // n))
    bwd_e = max(2, min(8, 128 // n))
    return Config(fwd_e, 4, bwd_e, 8, t)


def vectorize_interpreter_scan():
    """Under TRITON_INTERPRET=1, make tl.associative_scan step along its axis over whole slices instead
    of calling the combine function once per element (triton 3.6's interpreter does that: minutes for a
    few tiles). A combine function is elementwise by definition, so the result is the same. For tests
    and CPU checks of the benchmark; does nothing when compiled or when the interpreter lacks ScanOps."""
    if not INTERPRET:
        return
    try:
        import numpy as np
        from triton.runtime.interpreter import ScanOps
    except ImportError:
        return

    def generic_scan(self, input):
        data = [arg.handle.data for arg in input]
        out = [np.empty_like(d) for d in data]
        acc = None
        for k in range(data[0].shape[self.axis]):
            cur = tuple(self.to_tensor(np.take(d, k, axis=self.axis), arg.dtype) for d, arg in zip(data, input))
            if acc is None:
                acc = cur
            else:
                ret = self.combine_fn.fn(*acc, *cur)
                acc = ret if isinstance(ret, tuple) else (ret,)
            for o, a in zip(out, acc):
                idx = [slice(None)] * o.ndim
                idx[self.axis] = k
                o[tuple(idx)] = a.handle.data
        return [self.to_tensor(o, arg.dtype) for o, arg in zip(out, input)]

    ScanOps.generic_scan = generic_scan


def available():
    """Triton imports (this module did) and there is a device to run it: CUDA, or the interpreter."""
    return torch.cuda.is_available() or INTERPRET


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _tile(ptr, rows, s_row, tt, mask):
    """A (rows, BLOCK_T) tile in the input's dtype, 0 where masked."""
    return tl.load(ptr + rows[:, None] * s_row + tt[None, :], mask=mask, other=0.0)


@triton.jit
def _dt(delta, bias, mask, SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """dt (BLOCK_E, BLOCK_T) fp32 from a delta tile, 0 where masked (a step there is the identity); also
    delta + bias."""
    raw = delta.to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _prologue(A_ptr, D_ptr, bias_ptr, E, N, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's channel, state and step offsets, masks, (E, N) offsets (also of h0/hlast, dh0) and
    its channels' A (padding: a = 1, x = 0), bias and D in fp32 (zeros where absent)."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    me, mn = offs_e < E, offs_n < N
    men = me[:, None] & mn[None, :]
    en = offs_e[:, None] * N + offs_n[None, :]
    A = tl.load(A_ptr + en, mask=men, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_E], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_e, mask=me, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_E], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_e, mask=me, other=0.0).to(tl.float32)
    return offs_e, offs_n, offs_t, me, mn, men, en, A, bias, Dv


@triton.jit
def _fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
                y_ptr, hlast_ptr, states_ptr,
                E, N, L, n_tiles,
                s_ub, s_ue, s_db, s_de, s_Bb, s_Bn, s_Cb, s_Cn, s_zb, s_ze, s_yb, s_ye,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_H0: tl.constexpr, WRITE_Y: tl.constexpr, STORE_STATES: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_e, b = tl.program_id(0), tl.program_id(1)
    offs_e, offs_n, offs_t, me, mn, men, en, A, bias, Dv = _prologue(
        A_ptr, D_ptr, bias_ptr, E, N, HAS_D, HAS_BIAS, BLOCK_E, BLOCK_N, BLOCK_T)
    h = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + b * E * N + en, mask=men, other=0.0).to(tl.float32)
    u_ptr += b * s_ub
    delta_ptr += b * s_db
    B_ptr += b * s_Bb
    C_ptr += b * s_Cb
    z_ptr += b * s_zb
    y_ptr += b * s_yb
    A2 = A * LOG2E
    # the loads of tile i + 1 are issued before tile i is computed (loop-carried *_nx), so they overlap it
    m2 = me[:, None] & (offs_t < L)[None, :]
    mnt = mn[:, None] & (offs_t < L)[None, :]
    d_nx = _tile(delta_ptr, offs_e, s_de, offs_t, m2)
    u_nx = _tile(u_ptr, offs_e, s_ue, offs_t, m2)
    B_nx = _tile(B_ptr, offs_n, s_Bn, offs_t, mnt)
    C_nx = B_nx
    z_nx = u_nx
    if WRITE_Y:
        C_nx = _tile(C_ptr, offs_n, s_Cn, offs_t, mnt)
        if HAS_Z:
            z_nx = _tile(z_ptr, offs_e, s_ze, offs_t, m2)
    i = 0
    while i < n_tiles:  # a while loop, not range(n_tiles): the interpreter cannot index with a runtime int
        tt = i * BLOCK_T + offs_t
        m2 = me[:, None] & (tt < L)[None, :]
        d_t, u_t, B_t, C_t, z_t = d_nx, u_nx, B_nx, C_nx, z_nx
        tn = tt + BLOCK_T
        m2n = me[:, None] & (tn < L)[None, :]
        mntn = mn[:, None] & (tn < L)[None, :]
        d_nx = _tile(delta_ptr, offs_e, s_de, tn, m2n)
        u_nx = _tile(u_ptr, offs_e, s_ue, tn, m2n)
        B_nx = _tile(B_ptr, offs_n, s_Bn, tn, mntn)
        if WRITE_Y:
            C_nx = _tile(C_ptr, offs_n, s_Cn, tn, mntn)
            if HAS_Z:
                z_nx = _tile(z_ptr, offs_e, s_ze, tn, m2n)
        if STORE_STATES:  # the state entering tile i: (b, tiles, E, N)
            tl.store(states_ptr + (b * n_tiles + i) * E * N + en, h, mask=men)
        dt, _ = _dt(d_t, bias, m2, SOFTPLUS, HAS_BIAS)
        u = u_t.to(tl.float32)
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])                # (E, N, T)
        x = (dt * u)[:, None, :] * B_t.to(tl.float32)[None, :, :]
        P, H = tl.associative_scan((a, x), 2, _combine)
        hs = P * h[:, :, None] + H
        if WRITE_Y:
            y = tl.sum(hs * C_t.to(tl.float32)[None, :, :], axis=1)
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                z = z_t.to(tl.float32)
                y *= z / (1.0 + tl.exp(-z))
            tl.store(y_ptr + offs_e[:, None] * s_ye + tt[None, :], y.to(y_ptr.dtype.element_ty), mask=m2)
        # steps past L are the identity, so the tile's last column is the state after step min(L, end) - 1
        h = tl.sum(tl.where(offs_t[None, None, :] == BLOCK_T - 1, hs, 0.0), axis=2)
        i += 1
    tl.store(hlast_ptr + b * E * N + en, h, mask=men)


@triton.jit
def _bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr, dlast_ptr,
                du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
                E, N, L, n_tiles,
                s_ub, s_ue, s_db, s_de, s_Bb, s_Bn, s_Cb, s_Cn, s_zb, s_ze, s_ob, s_oe,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_DOUT: tl.constexpr, HAS_DLAST: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_e, b = tl.program_id(0), tl.program_id(1)
    n_eb = tl.num_programs(0)
    offs_e, offs_n, offs_t, me, mn, men, en, A, bias, Dv = _prologue(
        A_ptr, D_ptr, bias_ptr, E, N, HAS_D, HAS_BIAS, BLOCK_E, BLOCK_N, BLOCK_T)
    S = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)   # d(loss)/d(state after the current tile), from later
    if HAS_DLAST:
        S = tl.load(dlast_ptr + b * E * N + en, mask=men, other=0.0).to(tl.float32)
    dA_acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    u_ptr += b * s_ub
    delta_ptr += b * s_db
    B_ptr += b * s_Bb
    C_ptr += b * s_Cb
    z_ptr += b * s_zb
    dout_ptr += b * s_ob
    # the outputs du, ddelta, dz are contiguous (b, E, L); dB, dC partials (b, n_eb, N, L)
    du_ptr += b * E * L
    ddelta_ptr += b * E * L
    dz_ptr += b * E * L
    dB_ptr += (b * n_eb + pid_e) * N * L
    dC_ptr += (b * n_eb + pid_e) * N * L
    A2 = A * LOG2E
    # tiles in reverse; the loads of tile i - 1 are issued before tile i is computed (loop-carried *_nx)
    i = n_tiles - 1
    tt = i * BLOCK_T + offs_t
    m2 = me[:, None] & (tt < L)[None, :]
    mnt = mn[:, None] & (tt < L)[None, :]
    mnx = me[:, None] & ((offs_t + 1 < BLOCK_T) & (tt + 1 < L))[None, :]
    h_nx = tl.load(states_ptr + (b * n_tiles + i) * E * N + en, mask=men, other=0.0)
    d_nx = _tile(delta_ptr, offs_e, s_de, tt, m2)
    dn_nx = _tile(delta_ptr, offs_e, s_de, tt + 1, mnx)
    u_nx = _tile(u_ptr, offs_e, s_ue, tt, m2)
    B_nx = _tile(B_ptr, offs_n, s_Bn, tt, mnt)
    C_nx = _tile(C_ptr, offs_n, s_Cn, tt, mnt)
    o_nx = u_nx
    z_nx = u_nx
    if HAS_DOUT:
        o_nx = _tile(dout_ptr, offs_e, s_oe, tt, m2)
    if HAS_Z:
        z_nx = _tile(z_ptr, offs_e, s_ze, tt, m2)
    while i >= 0:
        tt = i * BLOCK_T + offs_t
        mt = tt < L
        m2 = me[:, None] & mt[None, :]
        mnt = mn[:, None] & mt[None, :]
        # decays of the next step, a_{t+1}: 1 past the tile (the carry S covers it) and past L
        mnx = me[:, None] & ((offs_t + 1 < BLOCK_T) & (tt + 1 < L))[None, :]
        h, d_t, dn_t, u_t, B_t, C_t, o_t, z_t = h_nx, d_nx, dn_nx, u_nx, B_nx, C_nx, o_nx, z_nx
        tp = tt - BLOCK_T  # tile i - 1 (nothing is loaded past the first)
        m2p = me[:, None] & (tp >= 0)[None, :]
        mntp = mn[:, None] & (tp >= 0)[None, :]
        h_nx = tl.load(states_ptr + (b * n_tiles + i - 1) * E * N + en, mask=men & (i > 0), other=0.0)
        d_nx = _tile(delta_ptr, offs_e, s_de, tp, m2p)
        dn_nx = _tile(delta_ptr, offs_e, s_de, tp + 1, m2p & (offs_t + 1 < BLOCK_T)[None, :])
        u_nx = _tile(u_ptr, offs_e, s_ue, tp, m2p)
        B_nx = _tile(B_ptr, offs_n, s_Bn, tp, mntp)
        C_nx = _tile(C_ptr, offs_n, s_Cn, tp, mntp)
        if HAS_DOUT:
            o_nx = _tile(dout_ptr, offs_e, s_oe, tp, m2p)
        if HAS_Z:
            z_nx = _tile(z_ptr, offs_e, s_ze, tp, m2p)
        dt, raw = _dt(d_t, bias, m2, SOFTPLUS, HAS_BIAS)
        u = u_t.to(tl.float32)
        Bt = B_t.to(tl.float32)
        Ct = C_t.to(tl.float32)
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])
        dtu = dt * u
        x = dtu[:, None, :] * Bt[None, :, :]
        P, H = tl.associative_scan((a, x), 2, _combine)
        hs = P * h[:, :, None] + H                                   # states of the tile's steps
        dy = tl.zeros([BLOCK_E, BLOCK_T], dtype=tl.float32)
        if HAS_DOUT:
            dy = o_t.to(tl.float32)
        if HAS_Z:
            z = z_t.to(tl.float32)
            sz = 1.0 / (1.0 + tl.exp(-z))
            pre = tl.sum(hs * Ct[None, :, :], axis=1)               # the output before the gate
            if HAS_D:
                pre += Dv[:, None] * u
            tl.store(dz_ptr + offs_e[:, None] * L + tt[None, :],
                     (dy * pre * sz * (1.0 + z * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dy * z * sz
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
        dtn, _ = _dt(dn_t, bias, mnx, SOFTPLUS, HAS_BIAS)
        an = tl.exp2(dtn[:, None, :] * A2[:, :, None])
        g = dy[:, None, :] * Ct[None, :, :]
        Pr, R = tl.associative_scan((an, g), 2, _combine, reverse=True)
        dh = R + Pr * S[:, :, None]                                  # d(loss)/d(h_t)
        S = tl.sum(tl.where(offs_t[None, None, :] == 0, a * dh, 0.0), axis=2)
        tl.store(dC_ptr + offs_n[:, None] * L + tt[None, :], tl.sum(dy[:, None, :] * hs, axis=0), mask=mnt)
        tl.store(dB_ptr + offs_n[:, None] * L + tt[None, :], tl.sum(dh * dtu[:, None, :], axis=0), mask=mnt)
        sB = tl.sum(dh * Bt[None, :, :], axis=1)                     # sum_n dh B: d/d(dt u)
        q = dh * (hs - x)                                            # dh_t * a_t h_{t-1}: d/d(dt A) through exp
        dA_acc += tl.sum(q * dt[:, None, :], axis=2)
        ddt = u * sB + tl.sum(q * A[:, :, None], axis=1)
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp(-raw))
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        du = dt * sB + Dv[:, None] * dy
        tl.store(du_ptr + offs_e[:, None] * L + tt[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddelta_ptr + offs_e[:, None] * L + tt[None, :], ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
        i -= 1
    tl.store(dh0_ptr + b * E * N + en, S, mask=men)
    tl.store(dA_ptr + b * E * N + en, dA_acc, mask=men)
    tl.store(dD_ptr + b * E + offs_e, dD_acc, mask=me)
    tl.store(dbias_ptr + b * E + offs_e, dbias_acc, mask=me)


def _time_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, h0, cfg, write_y=True, store_states=False):
    b, E, L = u.shape
    N = A.shape[1]
    f32 = {"dtype": torch.float32, "device": u.device}
    y = torch.empty(b, E, L, dtype=u.dtype, device=u.device) if write_y else u
    hlast = torch.empty(b, E, N, **f32)
    states = torch.empty(b, triton.cdiv(L, cfg.t), E, N, **f32) if store_states else hlast
    zz = z if z is not None else u
    grid = (triton.cdiv(E, cfg.fwd_e), b)
    with device_of(u):
        _fwd_kernel[grid](
            u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A,
            h0 if h0 is not None else A, y, hlast, states, E, N, L, triton.cdiv(L, cfg.t),
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
            C.stride(0), C.stride(1), zz.stride(0), zz.stride(1), y.stride(0), y.stride(1),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
            HAS_H0=h0 is not None, WRITE_Y=write_y, STORE_STATES=store_states,
            BLOCK_E=cfg.fwd_e, BLOCK_N=triton.next_power_of_2(N), BLOCK_T=cfg.t, num_warps=cfg.fwd_warps)
    return y, hlast, states


def prepare(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None):
    """The layouts the kernels read: time contiguous (other strides free) in the inputs' dtypes; A, D,
    delta_bias and the initial state contiguous fp32."""
    u, delta, B, C = (_time_contiguous(x) for x in (u, delta, B, C))
    z = _time_contiguous(z) if z is not None else None
    f32 = [x.float().contiguous() if x is not None else None for x in (A, D, delta_bias, initial_state)]
    return (u, delta, f32[0], B, C, f32[1], z, f32[2], f32[3])


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """-> y (b, E, L) in u's dtype and the last state (b, E, N) fp32; inputs as prepare() returns them.
    No autograd: for a fused autograd Function that calls the scan inside (like selective_scan_cuda.fwd)."""
    cfg = config(u.shape[1], u.shape[2], A.shape[1])
    y, hlast, _ = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cfg)
    return y, hlast


def scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, dout, dlast):
    """The gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state) of sum(y * dout) +
    sum(last * dlast), the same inputs as scan_fwd; dout or dlast may be None (zero). du, ddelta, dz
    are in their inputs' dtypes, the rest fp32; dD, dz, ddelta_bias are None without D, z, delta_bias.
    Reruns the forward for the state entering every tile."""
    b, E, L = u.shape
    N = A.shape[1]
    cfg = config(E, L, N)
    f32 = {"dtype": torch.float32, "device": u.device}
    _, _, states = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, cfg,
                        write_y=False, store_states=True)
    if dout is not None:
        dout = _time_contiguous(dout)
    if dlast is not None:
        dlast = dlast.float().contiguous()
    n_eb = triton.cdiv(E, cfg.bwd_e)
    du = torch.empty(b, E, L, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(b, E, L, dtype=delta.dtype, device=u.device)
    dz = torch.empty(b, E, L, dtype=z.dtype, device=u.device) if z is not None else None
    dB_part, dC_part = torch.empty(2, b, n_eb, N, L, **f32)
    dA_part, dh0 = torch.empty(2, b, E, N, **f32)
    dD_part, dbias_part = torch.empty(2, b, E, **f32)
    do = dout if dout is not None else u
    zz = z if z is not None else u
    with device_of(u):
        _bwd_kernel[(n_eb, b)](
            u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A,
            states, do, dlast if dlast is not None else A,
            du, ddelta, dz if dz is not None else du, dB_part, dC_part, dA_part, dD_part, dbias_part, dh0,
            E, N, L, triton.cdiv(L, cfg.t),
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
            C.stride(0), C.stride(1), zz.stride(0), zz.stride(1), do.stride(0), do.stride(1),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_DOUT=dout is not None, HAS_DLAST=dlast is not None,
            BLOCK_E=cfg.bwd_e, BLOCK_N=triton.next_power_of_2(N), BLOCK_T=cfg.t, num_warps=cfg.bwd_warps)
    return (du, ddelta, dA_part.sum(0), dB_part.sum(1), dC_part.sum(1),
            dD_part.sum(0) if D is not None else None, dz,
            dbias_part.sum(0) if delta_bias is not None else None, dh0)


class SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
        ctx.set_materialize_grads(False)  # dout / dlast are None when unused: skip them
        keep_dtypes(ctx, (u, delta, A, B, C, D, z, delta_bias, initial_state))
        x = prepare(u, delta, A, B, C, D, z, delta_bias, initial_state)
        y, hlast = scan_fwd(*x[:8], delta_softplus, x[8])
        ctx.save_for_backward(*x)
        ctx.softplus = delta_softplus
        return y, hlast

    @staticmethod
    def backward(ctx, dout, dlast):
        x = ctx.saved_tensors
        grads = scan_bwd(*x[:8], ctx.softplus, x[8], dout, dlast)
        return input_grads(ctx, grads[:8] + (None,) + grads[8:])   # none for delta_softplus


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, return_last_state=False):
    y, last = SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (y, last) if return_last_state else y

"""One decoding step of the selective scan in one Triton kernel (models/mixer_cuda.py, _decode_step).

Reads a direction's composed tensors as they are (ScanTensors: dt_proj's weight and bias, A_log, D,
in any dtype) where mamba_ssm's selective_state_update wants dt already projected and A, D and the
bias in fp32: for a Mamba layer that is six kernels fewer a token (the dt_proj product, A_log's cast,
exp and negation, D's and the bias's casts), in a step made of tiny kernels. Per channel:
dt = softplus(round(dt_w @ dt_in) + dt_b), h = exp(-exp(A_log) dt) h + dt B u (in place, fp32),
y = (C h + D u) silu(z). Runs on CUDA, or on the CPU under TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl

from . import device_of


@triton.jit
def _step_kernel(h_ptr, u_ptr, dtin_ptr, dtw_ptr, dtb_ptr, alog_ptr, b_ptr, c_ptr, d_ptr, z_ptr, y_ptr,
                 E, N, R, su_b, su_e, sdt_b, sb_b, sc_b, sz_b, sz_e,
                 BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_Z: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    me, mn, mr = e < E, n < N, r < R
    men = me[:, None] & mn[None, :]
    dt_in = tl.load(dtin_ptr + b * sdt_b + r, mask=mr, other=0.0)
    w = tl.load(dtw_ptr + e[:, None] * R + r[None, :], mask=me[:, None] & mr[None, :], other=0.0)
    # rounded as the product F.linear would have returned in the input's dtype (the training path's too)
    dt = tl.sum(w.to(tl.float32) * dt_in.to(tl.float32)[None, :], axis=1).to(dt_in.dtype).to(tl.float32)
    dt += tl.load(dtb_ptr + e, mask=me, other=0.0).to(tl.float32)
    dt = tl.where(dt <= 20.0, tl.log(tl.exp(dt) + 1.0), dt)
    a = -tl.exp(tl.load(alog_ptr + e[:, None] * N + n[None, :], mask=men, other=0.0).to(tl.float32))
    u = tl.load(u_ptr + b * su_b + e * su_e, mask=me, other=0.0).to(tl.float32)
    bb = tl.load(b_ptr + b * sb_b + n, mask=mn, other=0.0).to(tl.float32)
    cc = tl.load(c_ptr + b * sc_b + n, mask=mn, other=0.0).to(tl.float32)
    h_ptrs = h_ptr + b * E * N + e[:, None] * N + n[None, :]
    h = tl.load(h_ptrs, mask=men, other=0.0)
    h = h * tl.exp(a * dt[:, None]) + bb[None, :] * (dt * u)[:, None]
    tl.store(h_ptrs, h, mask=men)
    y = tl.sum(h * cc[None, :], axis=1) + u * tl.load(d_ptr + e, mask=me, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * sz_b + e * sz_e, mask=me, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + b * E + e, y.to(y_ptr.dtype.element_ty), mask=me)


def state_step(ssm, u, dt_in, dt_w, dt_b, A_log, B, C, D, z=None):
    """ssm (b, E, N) fp32 contiguous, updated in place; u, z (b, E); dt_in (b, R), B, C (b, N) with unit
    stride along their last dimension; dt_w (E, R), A_log (E, N) contiguous; dt_b, D (E,).
    -> y (b, E) in u's dtype."""
    bsz, E, N = ssm.shape
    R = dt_w.shape[1]
    assert ssm.dtype == torch.float32 and ssm.is_contiguous() and dt_w.is_contiguous() and A_log.is_contiguous()
    assert dt_in.stride(-1) == 1 and B.stride(-1) == 1 and C.stride(-1) == 1
    y = torch.empty(bsz, E, dtype=u.dtype, device=u.device)
    block_n = triton.next_power_of_2(N)
    block_e = 32 if block_n <= 16 else 16 if block_n <= 32 else 8   # as selective_state_update's
    zz = z if z is not None else u   # a pointer the kernel never reads (HAS_Z false)
    with device_of(u):
        _step_kernel[(triton.cdiv(E, block_e), bsz)](
            ssm, u, dt_in, dt_w, dt_b, A_log, B, C, D, zz, y, E, N, R, u.stride(0), u.stride(1), dt_in.stride(0),
            B.stride(0), C.stride(0), zz.stride(0), zz.stride(1), BLOCK_E=block_e, BLOCK_N=block_n,
            BLOCK_R=triton.next_power_of_2(R), HAS_Z=z is not None, num_warps=4)
    return y

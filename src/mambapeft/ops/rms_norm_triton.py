"""RMSNorm in Triton (models/norm.py): the memory-efficient norm's input gradient (_LeanRMSNorm), and the
default forward without autograd (rms_norm, below).

The gradient, from the kept output y = w * x_hat (in the autocast dtype), the per-row rstd and the weight:
x_hat = y / w, g = w * dy, dx = rstd * (g - x_hat * mean(g * x_hat)). In torch that is seven passes
over fp32 tensors of x's size; here each row is read once (y and dy in their dtype) and dx written
once, with the row's mean in registers. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl

from . import device_of


def _warps(block):
    """Warps for a row of `block` values (both kernels: a row a program)."""
    return min(16, max(1, block // 256))


@triton.jit
def _dx_kernel(y_ptr, dy_ptr, w_ptr, rstd_ptr, dx_ptr, D, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    m = offs < D
    w = tl.load(w_ptr + offs, mask=m, other=1.0).to(tl.float32)
    x_hat = tl.load(y_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32) / w
    g = tl.load(dy_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32) * w
    mean = tl.sum(g * x_hat, axis=0) / D
    dx = tl.load(rstd_ptr + row) * (g - x_hat * mean)
    tl.store(dx_ptr + row * D + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def rms_norm_dx(y, dy, weight, rstd, dtype):
    """y, dy (..., D) contiguous, weight (D,), rstd (..., 1) fp32 -> dx (..., D) in `dtype`."""
    D = y.shape[-1]
    y, dy = y.contiguous(), dy.contiguous()
    dx = torch.empty(y.shape, dtype=dtype, device=y.device)
    block = triton.next_power_of_2(D)
    with device_of(y):
        _dx_kernel[(y.numel() // D,)](y, dy, weight.contiguous(), rstd.contiguous(), dx, D, BLOCK_D=block,
                                      num_warps=_warps(block))
    return dx


@triton.jit
def _forward_kernel(x_ptr, w_ptr, y_ptr, D, eps, BLOCK_D: tl.constexpr, IN_DTYPE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    m = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=m, other=0.0).to(IN_DTYPE).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = (x * rstd).to(IN_DTYPE).to(tl.float32) * w
    tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=m)


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def takes(*dtypes):
    """Whether rms_norm takes tensors of these dtypes."""
    return all(d in _TL for d in dtypes)


def rms_norm(x, weight, eps, input_dtype):
    """RMSNorm's default forward (models/norm.py, RMSNorm._default) where no gradient is wanted, in one kernel
    instead of five (cast, cast, norm, cast, product): a decoding step is a string of tiny kernels.
    x (..., D) rounded to `input_dtype`, normalised in fp32, rounded again, times the weight, in the
    dtype `weight * x.to(input_dtype)` has."""
    D = x.shape[-1]
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, input_dtype), device=x.device)
    block = triton.next_power_of_2(D)
    with device_of(x):
        _forward_kernel[(x.numel() // D,)](x, weight.contiguous(), y, D, eps, BLOCK_D=block,
                                           IN_DTYPE=_TL[input_dtype], num_warps=_warps(block))
    return y


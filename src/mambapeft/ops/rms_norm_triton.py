"""The memory-efficient RMSNorm's input gradient in one Triton kernel (models/norm.py, _LeanRMSNorm).

From the kept output y = w * x_hat (in the autocast dtype), the per-row rstd and the weight:
x_hat = y / w, g = w * dy, dx = rstd * (g - x_hat * mean(g * x_hat)). In torch that is seven passes
over fp32 tensors of x's size; here each row is read once (y and dy in their dtype) and dx written
once, with the row's mean in registers. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl


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
    _dx_kernel[(y.numel() // D,)](y, dy, weight.contiguous(), rstd.contiguous(), dx, D, BLOCK_D=block,
                                  num_warps=min(16, max(1, block // 256)))
    return dx

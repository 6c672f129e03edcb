"""RMSNorm, with an opt-in memory-efficient backward (Apex's `memory_efficient=True` idea, issue 13).

By default the norm takes the fp32 residual stream and returns fp32; autograd keeps that fp32 input
for the backward (at the mamba-1.4b shape, 4 x 2048 tokens, 67 MB a layer), and under bf16 autocast
each consumer linear casts the output to bf16 and keeps its own copy.

With `output_dtype` set to the autocast dtype (`memory_efficient_norm(model, dtype)`), the norm
returns the very values the consumers' autocast cast would have made, already in that dtype (so the
forward is bit-identical: their cast becomes a no-op), and keeps for its backward only that output,
which the consumers keep anyway, plus the per-row rstd: x_hat is recovered as y / w. The gradient
then differs from the default one by the rounding of y (relative 2^-9 on x_hat) and by the summing
of the consumers' gradients in the output dtype.

Where no gradient is wanted (decoding, evaluation) on CUDA, the default forward runs as one Triton
kernel (ops/rms_norm_triton.py) instead of five small ones."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import cuda_triton


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.output_dtype = None   # memory_efficient_norm: the autocast dtype the output is handed on in
        self._zero_check = None    # (weight key, whether the weight has an exact zero)

    def forward(self, x, input_dtype=None):
        """input_dtype: round x to it first (the cast a block makes before its norm)."""
        input_dtype = input_dtype or x.dtype
        if (kernel := self._inference_kernel(x, input_dtype)) is not None:
            return kernel.rms_norm(x, self.weight, self.eps, input_dtype)
        x = x.to(input_dtype)
        dtype = self._lean_dtype(x)
        y = self._default(x) if dtype is None or self._weight_has_zero() else None
        if y is not None:
            return y if dtype is None else y.to(dtype)
        return _LeanRMSNorm.apply(x, self.weight, self.eps, dtype)

    def _default(self, x):
        # normalised in fp32 and cast back before the weight, as transformers' MambaRMSNorm
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)

    def _inference_kernel(self, x, input_dtype):
        """ops/rms_norm_triton.py where no gradient is wanted (decoding, evaluation) on CUDA: the cast, norm and
        product in one kernel, the same values as _default up to the order of the sum of squares."""
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return None
        if torch.compiler.is_compiling():
            return None
        kernel = cuda_triton("rms_norm_triton", x)
        return kernel if kernel is not None and kernel.takes(x.dtype, input_dtype, self.weight.dtype) else None

    def _lean_dtype(self, x):
        """output_dtype where the lean path applies: a gradient is wanted, and the consumers can take
        the dtype (x's own, or autocast's on x's device); else None (the default path)."""
        d = self.output_dtype
        if d is None or not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad):
            return None
        dev = x.device.type
        if d == x.dtype or (torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == d):
            return d
        return None

    def _weight_has_zero(self):
        """Whether the weight has an exact zero (y / w cannot recover x_hat there: then the default
        path runs). Asking synchronises with the device, so the answer is kept per weight storage and
        version: an optimizer step on a trained weight asks again, a frozen one is asked once. Inside
        a CUDA graph capture nothing may synchronise: an unanswered weight takes the default path."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._zero_check is None or self._zero_check[0] != key:
            if w.is_cuda and torch.cuda.is_current_stream_capturing():
                return True
            self._zero_check = (key, bool((w == 0).any()))
        return self._zero_check[1]


class _LeanRMSNorm(torch.autograd.Function):
    """y = RMSNorm(x) in `dtype`, keeping y, rstd and the weight (not x) for the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps, dtype):
        xf = x.float()
        y = (weight * F.rms_norm(xf, x.shape[-1:], eps=eps).to(x.dtype)).to(dtype)   # as RMSNorm._default
        # sum of squares without an (x.shape) fp32 temporary; only the backward reads rstd
        rstd = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1] + eps)
        ctx.save_for_backward(y, rstd, weight)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        y, rstd, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[1] and (kernel := _dx_kernel(y)) is not None:
            return kernel.rms_norm_dx(y, dy, weight, rstd, ctx.x_dtype), None, None, None
        w = weight.float()
        x_hat = y.float() / w                # new tensors (y itself when it is fp32): safe to edit in place
        g = dy.float() * w                   # the gradient at x_hat
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.float() * x_hat).reshape(-1, w.shape[0]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            # d(x * rstd)/dx with rstd = (mean(x^2) + eps)^-1/2 gives rstd * (g - x_hat * mean(g * x_hat));
            # in place, so that the backward holds three fp32 tensors of x's size at most
            m = (g * x_hat).mean(-1, keepdim=True)
            dx = g.sub_(x_hat.mul_(m)).mul_(rstd).to(ctx.x_dtype)
        return dx, dw, None, None


def _dx_kernel(y):
    """ops/rms_norm_triton.py for CUDA tensors where triton imports (one pass instead of seven), else None."""
    return cuda_triton("rms_norm_triton", y)


def memory_efficient_norm(model, dtype):
    """Set every RMSNorm of `model` to hand its output on in `dtype` (the autocast dtype training runs
    under, e.g. torch.bfloat16) and keep only that output for its backward; None restores the default.
    Returns how many norms were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.output_dtype = dtype
            n += 1
    return n

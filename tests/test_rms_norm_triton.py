"""ops/rms_norm_triton.py (the memory-efficient norm's input gradient in one kernel) under Triton's
interpreter on the CPU, or on CUDA: equal to the torch backward of models/norm.py's lean path."""
import importlib.util
import os

import pytest
import torch

from mambapeft.models.norm import RMSNorm

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read when triton compiles the kernel
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_the_torch_backward(dtype, monkeypatch):
    from mambapeft.models import norm as norm_module
    from mambapeft.ops import rms_norm_triton
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(100).to(DEV)                                    # D not a power of two
    with torch.no_grad():
        norm.weight.copy_(torch.rand(100, generator=g) + 0.5)
    norm.output_dtype = dtype
    x = (torch.randn(3, 7, 100, generator=g) * 3).to(DEV).requires_grad_()
    dy = torch.randn(3, 7, 100, generator=g).to(DEV)
    with torch.autocast(DEV, dtype=dtype, enabled=dtype != torch.float32):
        y = norm(x)
    assert type(y.grad_fn).__name__ == "_LeanRMSNormBackward"
    monkeypatch.setattr(norm_module, "_dx_kernel", lambda y: None)   # the torch formula
    (ref,) = torch.autograd.grad(y, x, dy.to(y.dtype), retain_graph=True)
    y_kept, rstd, weight = y.grad_fn.saved_tensors
    got = rms_norm_triton.rms_norm_dx(y_kept, dy.to(y.dtype), weight, rstd, x.dtype)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

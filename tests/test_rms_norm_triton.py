"""ops/rms_norm_triton.py under Triton's interpreter on the CPU, or on CUDA: the memory-efficient norm's
input gradient equal to the torch backward of models/norm.py's lean path, and the inference forward
equal to RMSNorm's default path."""
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


@pytest.mark.parametrize("x_dtype,input_dtype,w_dtype", [(torch.float32, torch.bfloat16, torch.bfloat16),
                                                         (torch.float32, torch.float32, torch.bfloat16),
                                                         (torch.bfloat16, torch.bfloat16, torch.float32),
                                                         (torch.float32, torch.float32, torch.float32)])
def test_forward_kernel_equals_the_default(x_dtype, input_dtype, w_dtype, monkeypatch):
    """The inference kernel (one pass) against RMSNorm's default path on the block's call norm(h, dtype);
    on CUDA the norm takes it exactly where no gradient is wanted."""
    from mambapeft.ops import rms_norm_triton
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(100).to(DEV).to(w_dtype)             # D not a power of two
    with torch.no_grad():
        norm.weight.copy_(torch.rand(100, generator=g) + 0.5)
    x = (torch.randn(3, 7, 100, generator=g) * 3).to(DEV).to(x_dtype)
    ref = norm._default(x.to(input_dtype))
    got = rms_norm_triton.rms_norm(x, norm.weight.detach(), norm.eps, input_dtype)
    assert got.dtype == ref.dtype
    # a bf16 rounding on the way can flip by a unit (2^-7 relative at most, twice: 2^-6) where the sums of squares
    # differ in their last bit; Triton's interpreter truncates its three bf16 casts where the GPU rounds to nearest
    rounds = torch.bfloat16 in (input_dtype, ref.dtype)
    tol = (2 ** -5 if DEV == "cpu" else 2 ** -6) if rounds else 1e-6
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=1e-6)
    if DEV == "cuda":
        calls = []
        monkeypatch.setattr(rms_norm_triton, "rms_norm", lambda *a: calls.append(1) or ref)
        with torch.no_grad():
            norm(x, input_dtype)
        norm(x, input_dtype)                                # the weight trains: autograd's path
        assert calls == [1]


def test_other_dtypes_take_the_default_path(monkeypatch):
    """The kernel takes fp32, bf16 and fp16; a norm in fp64 (or with an fp64 weight) computes without it."""
    from mambapeft.ops import rms_norm_triton
    assert rms_norm_triton.takes(torch.float32, torch.bfloat16, torch.float16)
    assert not rms_norm_triton.takes(torch.float32, torch.float64)
    calls = []
    monkeypatch.setattr(rms_norm_triton, "rms_norm", lambda *a: calls.append(1))
    for x_dtype, w_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        norm = RMSNorm(100).to(DEV).to(w_dtype)
        x = torch.randn(3, 7, 100, device=DEV, dtype=x_dtype)
        with torch.no_grad():
            torch.testing.assert_close(norm(x), norm._default(x))
    with torch.no_grad():   # on CUDA the kernel's dtypes do take it (on the CPU nothing does)
        RMSNorm(100).to(DEV)(torch.randn(3, 100, device=DEV))
    assert calls == ([1] if DEV == "cuda" else [])

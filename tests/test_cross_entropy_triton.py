"""ops/cross_entropy_triton.py (a chunk's cross-entropy and its gradient in one kernel) under Triton's
interpreter on the CPU, or on CUDA: equal to torch's cross-entropy, alone and inside
linear_cross_entropy, with ignored rows and a vocabulary spanning several blocks."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import check_linear_cross_entropy

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read when triton compiles the kernel
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel(monkeypatch):
    from mambapeft.ops import cross_entropy_triton
    monkeypatch.setattr(cross_entropy_triton, "BLOCK_V", 32)   # 97 = three blocks and a part
    return cross_entropy_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_loss_and_gradient_equal_torch(kernel, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 97, generator=g) * 4).to(dtype).to(DEV)
    labels = torch.randint(0, 97, (9,), generator=g).to(DEV)
    labels[[2, 5]] = -1
    x = logits.float().requires_grad_()
    ref = F.cross_entropy(x, labels, ignore_index=-1, reduction="none")
    count = (labels >= 0).sum()
    (ref.sum() / count).backward()
    work = logits.clone()
    loss = kernel.chunk_loss_and_grad(work, labels, (1.0 / count.float()), True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(work.float(), x.grad, **tol)
    untouched = logits.clone()
    kernel.chunk_loss_and_grad(untouched, labels, (1.0 / count.float()), False)
    assert torch.equal(untouched, logits), "without a gradient the logits stay as they were"


@pytest.mark.parametrize("tie", [True, False])
def test_linear_cross_entropy_through_the_kernel(kernel, tie, monkeypatch):
    from mambapeft.ops import cross_entropy
    monkeypatch.setattr(cross_entropy, "fused_kernel", lambda h: kernel)
    check_linear_cross_entropy(DEV, tie, monkeypatch)

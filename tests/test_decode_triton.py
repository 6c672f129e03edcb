"""ops/decode_triton.py (a decoding step's state update in one kernel, reading dt_proj, A_log and D as
composed) under Triton's interpreter on the CPU, or on CUDA: equal to one step of the reference scan
from the same state, with dt_proj applied in torch, for strided inputs (the decode step's x and z have
channel stride b), a state count and ranks that are not powers of two, fp32 and bf16."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from mambapeft.ops.scan_ref import selective_scan_ref

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read when triton compiles the kernel
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,gate", [(16, True), (22, False)])
def test_step_equals_the_reference_scan(dtype, N, gate):
    from mambapeft.ops import decode_triton
    g = torch.Generator().manual_seed(0)
    b, E, R = 3, 40, 5                                   # E not a multiple of the kernel's block
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEV)   # noqa: E731
    xz = r(b, 2 * E).to(dtype).t().contiguous().t()      # as W_in @ h^T leaves it: channel stride b
    u, z = xz[:, :E], xz[:, E:] if gate else None
    x_dbl = r(b, R + 2 * N).to(dtype)
    dt_in, B, C = x_dbl.split([R, N, N], -1)             # strided views, as ssm_inputs returns them
    dt_w, dt_b = r(E, R, scale=0.3).to(dtype), r(E, scale=0.5).to(dtype)
    A_log = (torch.rand(E, N, generator=g) * 3).to(DEV).to(dtype)
    D = r(E).to(dtype)
    h0 = r(b, E, N)
    h = h0.clone()
    y = decode_triton.state_step(h, u, dt_in, dt_w, dt_b, A_log, B, C, D, z)
    delta = F.linear(dt_in, dt_w)                        # rounded to dtype, as the kernel rounds it
    ref_y, ref_h = selective_scan_ref(u[..., None], delta[..., None], -torch.exp(A_log.float()), B[..., None],
                                      C[..., None], D, None if z is None else z[..., None], dt_b, True,
                                      initial_state=h0, return_last_state=True)
    assert y.dtype == dtype and y.shape == (b, E)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h, ref_h, **tol)
    torch.testing.assert_close(y, ref_y[..., 0], **tol)

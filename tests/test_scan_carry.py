"""ops/scan_carry.py (an initial state's share of the scan output) under Triton's interpreter on the CPU:
equal to the closed form in torch autograd, forward and every gradient, and the zero-state scan plus
the carry equals the reference scan started from that state."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from mambapeft.ops.scan_ref import selective_scan_ref

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # read when triton compiles the kernels
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

b, E, L, N = 2, 40, 70, 5   # E and L not multiples of the blocks, N not a power of two
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(seed=0, L=L):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(DEV)
    return dict(y0=r(b, E, L), z=r(b, E, L), delta=r(b, E, L, scale=0.5) - 2.0, delta_bias=r(E, scale=0.3),
                A=-torch.rand(E, N, generator=g).to(DEV) * 3 - 0.1, C=r(b, N, L), h0=r(b, E, N))


def closed_form(y0, z, delta, delta_bias, A, C, h0):
    cs = F.softplus(delta + delta_bias[:, None]).cumsum(-1)                    # (b, E, L)
    decay = torch.exp(A[None, :, :, None] * cs[:, :, None, :])                 # (b, E, N, L)
    return (y0 + torch.einsum("bnl,benl,ben->bel", C, decay, h0)) * F.silu(z)


def test_forward_equals_closed_form():
    from mambapeft.ops import scan_carry
    x = inputs()
    torch.testing.assert_close(scan_carry.carry_fwd(**x), closed_form(**x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("want_out,length", [(False, L), (True, L), (True, 5 * 64 + 11)])
def test_backward_equals_autograd(want_out, length):
    """Also across several time tiles (BLOCK_T = 64): each tile's cumulative sums start from the earlier
    tiles' (forward) and end with the later tiles' (backward)."""
    from mambapeft.ops import scan_carry
    x = inputs(1, length)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    out = closed_form(**leaves)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    ref = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), dout)))
    dz = torch.empty_like(x["z"])
    g, ddelta, dA, dC, dh0, dbias, rec = scan_carry.carry_bwd(dout, x["y0"], x["z"], x["delta"], x["delta_bias"],
                                                              x["A"], x["C"], x["h0"], dz, want_out=want_out)
    for name, got in (("y0", g), ("z", dz), ("delta", ddelta), ("A", dA), ("C", dC), ("h0", dh0),
                      ("delta_bias", dbias)):
        torch.testing.assert_close(got, ref[name], rtol=1e-4, atol=1e-4, msg=name)
    assert (rec is None) != want_out
    if want_out:
        torch.testing.assert_close(rec, out.detach(), rtol=1e-5, atol=1e-5)


def test_zero_state_scan_plus_carry_is_the_scan_from_the_state():
    """The identity the affix prefill rests on, with strided (non-contiguous batch) inputs."""
    from mambapeft.ops import scan_carry
    x = inputs(3)
    g = torch.Generator().manual_seed(4)
    u = torch.randn(E, b, L, generator=g).to(DEV).transpose(0, 1)             # batch stride != E * L
    B, D = torch.randn(b, N, L, generator=g).to(DEV), torch.randn(E, generator=g).to(DEV)
    full = selective_scan_ref(u, x["delta"], x["A"], B, x["C"], D, x["z"], x["delta_bias"], True, initial_state=x["h0"])
    y0 = selective_scan_ref(u, x["delta"], x["A"], B, x["C"], D, None, x["delta_bias"], True)
    out = torch.empty(E, b, L, device=DEV).transpose(0, 1)
    got = scan_carry.carry_fwd(y0, x["z"], x["delta"], x["delta_bias"], x["A"], x["C"], x["h0"], out=out)
    assert got is out
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)

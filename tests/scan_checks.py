"""Checks of a selective scan backend against the reference recurrence (ops/scan_ref.py), shared by the
tests of the Triton scan and of our CUDA scan."""
import pytest
import torch

from mambapeft.ops.scan_ref import selective_scan_ref

# which optional inputs a test passes: D, z and the delta bias (full), an initial state, a last state in the loss
INPUT_SETS = pytest.mark.parametrize("full,init,last", [(True, True, True), (False, False, False),
                                                        (True, False, True), (False, True, False)],
                                     ids=["zDbias+init+last", "plain", "zDbias+last", "init"])


def make_inputs(b, E, N, L, full=True, init=True, dtype=torch.float32, device="cpu", seed=0):
    """Leaf tensors like a Mamba mixer's: u and z are strided views of one (b, L, 3E) projection."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device, dtype)

    xz = rnd(b, L, 3 * E)
    x = {"u": xz[..., :E].transpose(1, 2),
         "delta": (xz[..., E:2 * E] * 0.5 - 1.0).transpose(1, 2) if full else
                  (torch.rand(b, E, L, generator=g) * 0.5).to(device, dtype),
         "A": -torch.exp(torch.rand(E, N, generator=g) * 3).to(device, torch.float32),
         "B": rnd(b, N, L), "C": rnd(b, N, L)}
    if full:
        x.update(D=rnd(E).float(), z=xz[..., 2 * E:].transpose(1, 2), delta_bias=rnd(E, scale=0.3).float())
    if init:
        x["initial_state"] = rnd(b, E, N).float()
    return {k: v.detach().requires_grad_() for k, v in x.items()}, g


def scan_and_grads(fn, x, dy, dlast, full, **kw):
    """y, last state and the gradients of sum(y*dy) (+ sum(last*dlast) when dlast is given)."""
    for v in x.values():
        v.grad = None
    y, last = fn(**x, delta_softplus=full, return_last_state=True, **kw)
    loss = (y.float() * dy).sum() + ((last * dlast).sum() if dlast is not None else 0)
    loss.backward()
    return y.detach(), last.detach(), {k: v.grad.detach().clone() for k, v in x.items()}


def assert_close(actual, expected, what, tol):
    assert actual is not None, f"no gradient for {what}"
    scale = max(expected.abs().max().item(), 1.0)   # sums over many terms: tolerance relative to the scale
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def check_against_reference(fn, b, E, N, L, full, init, last, dtype=torch.float32, tol=2e-5, device="cpu"):
    """fn (a backend's call) against the reference on the same values in fp32: y, the last state and
    the gradient of every input."""
    x, g = make_inputs(b, E, N, L, full, init, dtype, device)
    dy = torch.randn(b, E, L, generator=g).to(device)
    dlast = torch.randn(b, E, N, generator=g).to(device) if last else None
    y, h, grads = scan_and_grads(fn, x, dy, dlast, full)
    # the reference on the same values in fp32: what the kernel computes, up to summation order
    x32 = {k: v.detach().float().requires_grad_() for k, v in x.items()}
    y_ref, h_ref, grads_ref = scan_and_grads(selective_scan_ref, x32, dy, dlast, full)
    assert y.dtype == dtype and y.shape == (b, E, L)
    assert h.dtype == torch.float32 and h.shape == (b, E, N)
    assert_close(y, y_ref, "y", tol)
    assert_close(h, h_ref, "last state", tol)
    for k in x:
        assert grads[k].dtype == x[k].dtype, k
        assert_close(grads[k], grads_ref[k], f"grad of {k}", 2.5 * tol)


def check_split(fn, split, L, E=16, device="cpu"):
    """fn scanning [0, split) and then [split, L) from that part's last state = fn scanning [0, L):
    outputs, last state and every gradient (the first part's through the state it hands on: the affix
    prefill's use)."""
    b, N = 2, 16
    x, g = make_inputs(b, E, N, L, True, True, device=device)
    dy = torch.randn(b, E, L, generator=g).to(device)
    dlast = torch.randn(b, E, N, generator=g).to(device)
    y, h, grads = scan_and_grads(fn, x, dy, dlast, True)

    def two_scans(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, return_last_state):
        parts = [{k: v[..., s] for k, v in (("u", u), ("delta", delta), ("z", z), ("B", B), ("C", C))}
                 for s in (slice(0, split), slice(split, None))]
        common = {"A": A, "D": D, "delta_bias": delta_bias, "delta_softplus": delta_softplus,
                  "return_last_state": True}
        y1, h1 = fn(**parts[0], **common, initial_state=initial_state)
        y2, h2 = fn(**parts[1], **common, initial_state=h1)
        return torch.cat([y1, y2], -1), h2

    y2, h2, grads2 = scan_and_grads(two_scans, x, dy, dlast, True)
    assert_close(y2, y, "y", 1e-5)
    assert_close(h2, h, "last state", 1e-5)
    for k in x:
        assert_close(grads2[k], grads[k], f"grad of {k}", 3e-5)


def check_against_mamba_ssm(fn, L, device="cuda"):
    """fn = mamba_ssm's selective_scan_fn (bf16, no initial state) at the mamba-130m shape: y and every
    gradient. Needs mamba_ssm (the caller skips without it)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    b, E, N = 2, 1536, 16
    x, g = make_inputs(b, E, N, L, True, False, torch.bfloat16, device)
    dy = torch.randn(b, E, L, generator=g).to(device)
    y, _, grads = scan_and_grads(fn, x, dy, None, True)

    def mamba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    y_m, _, grads_m = scan_and_grads(mamba, x, dy, None, True)
    assert_close(y, y_m, "y", 2e-2)
    for k in x:
        assert_close(grads[k], grads_m[k], f"grad of {k}", 5e-2)

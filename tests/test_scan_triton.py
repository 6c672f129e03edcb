"""The Triton scan (ops/scan_triton.py) against the reference recurrence: outputs, last state and the
gradient of every input, the initial state and a last state used in the loss included.

Without CUDA the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set here
before scan_triton is imported); without triton installed the module is skipped. The `gpu` tests run
the compiled kernels at larger shapes and against mamba_ssm's kernel.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated (import)
pytest.importorskip("triton", reason="the triton scan needs triton (not part of the dev extra)")

from mambapeft.ops import scan_triton  # noqa: E402
from mambapeft.ops.scan import resolve_backend, selective_scan  # noqa: E402
from mambapeft.ops.scan_ref import selective_scan_ref  # noqa: E402

if not HAS_CUDA and not scan_triton.INTERPRET:
    pytest.skip("no CUDA, and TRITON_INTERPRET was set to something other than 1", allow_module_level=True)

scan_triton.vectorize_interpreter_scan()  # same results, seconds instead of minutes under the interpreter
DEVICE = "cuda" if HAS_CUDA else "cpu"
SEQ = ("u", "delta", "z", "B", "C")  # the inputs with a time axis


def make_inputs(b, E, N, L, full=True, init=True, dtype=torch.float32, device=DEVICE, seed=0):
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


def check_against_reference(b, E, N, L, full, init, last, dtype=torch.float32, tol=2e-5, device=DEVICE):
    x, g = make_inputs(b, E, N, L, full, init, dtype, device)
    dy = torch.randn(b, E, L, generator=g).to(device)
    dlast = torch.randn(b, E, N, generator=g).to(device) if last else None
    y, h, grads = scan_and_grads(scan_triton.selective_scan_triton, x, dy, dlast, full)
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


# (E, N, L): one step; a ragged tail after one tile; several tiles with a ragged tail; E and N that
# are not powers of two (masked channels and state columns)
CASES = [(8, 4, 1), (16, 16, 63), (16, 8, 200), (12, 5, 70)]


@pytest.mark.parametrize("E,N,L", CASES, ids=[f"E{e}N{n}L{t}" for e, n, t in CASES])
@pytest.mark.parametrize("full,init,last", [(True, True, True), (False, False, False), (True, False, True),
                                            (False, True, False)],
                         ids=["zDbias+init+last", "plain", "zDbias+last", "init"])
def test_matches_reference(E, N, L, full, init, last):
    check_against_reference(2, E, N, L, full, init, last)


@pytest.mark.parametrize("L", [1, 63, 200])
def test_bf16_inputs(L):
    """bf16 u, delta, z, B, C: state and sums in fp32, y and their gradients in bf16."""
    check_against_reference(2, 16, 16, L, True, True, True, dtype=torch.bfloat16, tol=2e-2)


def test_tile_sizes(monkeypatch):
    """Other blocks: channels spread over several programs of 4, tiles of 8 steps (7 tiles + a tail)."""
    monkeypatch.setattr(scan_triton, "OVERRIDE", scan_triton.Config(4, 4, 4, 4, 8))
    check_against_reference(2, 12, 16, 61, True, True, True)


@pytest.mark.parametrize("split", [3, 40])
def test_prefill_split(split):
    """Scanning [prefix; main] == scanning the prefix, then main from its last state: outputs, last
    state and every gradient (the prefix's through the state it hands on)."""
    b, E, N, L = 2, 16, 16, 100
    x, g = make_inputs(b, E, N, L, True, True)
    dy = torch.randn(b, E, L, generator=g).to(DEVICE)
    dlast = torch.randn(b, E, N, generator=g).to(DEVICE)
    y, h, grads = scan_and_grads(scan_triton.selective_scan_triton, x, dy, dlast, True)

    def two_scans(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, return_last_state):
        parts = [{k: v[..., s] for k, v in (("u", u), ("delta", delta), ("z", z), ("B", B), ("C", C))}
                 for s in (slice(0, split), slice(split, None))]
        common = {"A": A, "D": D, "delta_bias": delta_bias, "delta_softplus": delta_softplus,
                  "return_last_state": True}
        y1, h1 = scan_triton.selective_scan_triton(**parts[0], **common, initial_state=initial_state)
        y2, h2 = scan_triton.selective_scan_triton(**parts[1], **common, initial_state=h1)
        return torch.cat([y1, y2], -1), h2

    y2, h2, grads2 = scan_and_grads(two_scans, x, dy, dlast, True)
    assert_close(y2, y, "y", 1e-5)
    assert_close(h2, h, "last state", 1e-5)
    for k in x:
        assert_close(grads2[k], grads[k], f"grad of {k}", 3e-5)


def test_backend_registered():
    """selective_scan(backend="triton") runs this scan; auto picks it for an initial state on CUDA."""
    x, _ = make_inputs(1, 8, 4, 20, True, True)
    x = {k: v.detach() for k, v in x.items()}
    y = selective_scan(**x, delta_softplus=True, backend="triton")
    assert_close(y, selective_scan_ref(**x, delta_softplus=True), "y", 1e-5)
    if HAS_CUDA:
        assert resolve_backend(x["u"], None, x["initial_state"]) == "triton"


def test_frozen_inputs_get_no_gradient():
    """Only y in the loss (the last state unused), A and D frozen: no gradient for them, one for the rest."""
    x, g = make_inputs(2, 8, 4, 40, True, True)
    x["A"].requires_grad_(False)
    x["D"].requires_grad_(False)
    y = scan_triton.selective_scan_triton(**x, delta_softplus=True)
    (y * torch.randn(2, 8, 40, generator=g).to(DEVICE)).sum().backward()
    assert x["A"].grad is None and x["D"].grad is None
    assert all(x[k].grad is not None for k in ("u", "delta", "B", "C", "z", "delta_bias", "initial_state"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("E,L", [(256, 1027), (96, 2048)])
def test_gpu_matches_reference(E, L, dtype):
    """The compiled kernels with the default blocks, many tiles."""
    check_against_reference(2, E, 16, L, True, True, True, dtype=dtype,
                            tol=2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_matches_mamba_ssm():
    """Same y and gradients as mamba_ssm's selective_scan_fn (bf16, no initial state) at the 130m shape."""
    sel = pytest.importorskip("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
    b, E, N, L = 2, 1536, 16, 1024
    x, g = make_inputs(b, E, N, L, True, False, torch.bfloat16)
    dy = torch.randn(b, E, L, generator=g).to(DEVICE)
    y, _, grads = scan_and_grads(scan_triton.selective_scan_triton, x, dy, None, True)

    def mamba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        return sel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    y_m, _, grads_m = scan_and_grads(mamba, x, dy, None, True)
    assert_close(y, y_m, "y", 2e-2)
    for k in x:
        assert_close(grads[k], grads_m[k], f"grad of {k}", 5e-2)

"""Every scan backend against the reference recurrence: outputs, last state and all gradients.

The tests are generic over backends: a new backend only has to be added to BACKENDS.
"""
import importlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mambapeft.ops.scan import selective_scan  # noqa: E402
from mambapeft.ops.scan_ref import selective_scan_ref  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _backend_param(name, module, needs_cuda):
    reason = None
    if needs_cuda and not HAS_CUDA:
        reason = "needs a CUDA device"
    else:
        try:
            mod = importlib.import_module(f"mambapeft.ops.{module}")
            if name == "cuda" and not mod.available():
                reason = "the cuda scan kernels are not available"
        except ImportError as e:
            reason = f"cannot import {module}: {e}"
    return pytest.param(name, id=name, marks=[pytest.mark.skipif(reason is not None, reason=reason or "")])


BACKENDS = [
    _backend_param("cpu", "scan_cpu", needs_cuda=False),
    _backend_param("chunked", "scan_chunked", needs_cuda=False),
    _backend_param("cuda", "scan_cuda", needs_cuda=True),
]
DEVICE = {"cpu": "cpu", "chunked": "cuda" if HAS_CUDA else "cpu", "cuda": "cuda"}


@pytest.fixture(autouse=True)
def _small_cpu_chunks(monkeypatch):
    """The test sizes fit in one chunk of the cpu backend: use chunks of 5-8 steps so that
    L=53 also crosses chunk boundaries (and ends on a partial chunk)."""
    from mambapeft.ops import scan_cpu
    monkeypatch.setattr(scan_cpu, "CHUNK_BYTES", 6144)


def make_inputs(b, E, N, L, full, init, device, dtype=torch.float32):
    """Leaf tensors like a Mamba mixer's; u, delta and z are strided views as they come from in_proj."""
    g = torch.Generator().manual_seed(1000 * N + L + 7 * full + 3 * init)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device, dtype)

    xz = rnd(b, L, 3 * E)
    x = {
        "u": xz[..., :E].transpose(1, 2),
        "delta": (xz[..., E:2 * E] * 0.5 - 1.0).transpose(1, 2) if full else
                 (torch.rand(b, E, L, generator=g) * 0.5).to(device, dtype),
        "A": -torch.exp(torch.rand(E, N, generator=g) * 3).to(device, dtype),  # decays from -1 to -20
        "B": rnd(b, N, L),
        "C": rnd(b, N, L),
    }
    if full:
        x.update(D=rnd(E), z=xz[..., 2 * E:].transpose(1, 2), delta_bias=rnd(E, scale=0.3))
    if init:
        x["initial_state"] = rnd(b, E, N)
    leaves = {k: v.detach().requires_grad_() for k, v in x.items()}  # keeps the strides
    return leaves, g


def run(fn, x, full, last, reverse, **kw):
    """Scan x (optionally time-reversed, as in the backward branch of a bidirectional block)."""
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
    args = {k: flip(v) if k in ("u", "delta", "z", "B", "C") else v for k, v in x.items()}
    out = fn(**args, delta_softplus=full, return_last_state=last, **kw)
    y, state = out if last else (out, None)
    return flip(y), state


def assert_close(actual, expected, what, rtol=1e-5, atol=1e-5):
    assert actual is not None, f"no gradient for {what}"
    assert actual.dtype == expected.dtype, what
    # atol relative to the tensor's scale: gradients summed over many terms are large
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(scale, 1.0),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("init", [False, True], ids=["zero0", "init"])
@pytest.mark.parametrize("last", [False, True], ids=["y", "y+last"])
@pytest.mark.parametrize("full", [False, True], ids=["plain", "zDbias"])
@pytest.mark.parametrize("L", [1, 53])
@pytest.mark.parametrize("N", [16, 22])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, N, L, full, last, init, reverse):
    if backend == "cuda" and init:
        pytest.skip("the cuda backend cannot start from an initial state")
    x, g = make_inputs(2, 6, N, L, full, init, DEVICE[backend])
    dy = torch.randn(2, 6, L, generator=g).to(DEVICE[backend])
    dlast = torch.randn(2, 6, N, generator=g).to(DEVICE[backend])
    results = []
    for fn, kw in ((selective_scan, {"backend": backend}), (selective_scan_ref, {})):
        for v in x.values():
            v.grad = None
        y, state = run(fn, x, full, last, reverse, **kw)
        # the cuda kernel returns its last state without gradient (see ops/scan_cuda.py)
        state_grad = last and not (backend == "cuda" and fn is selective_scan)
        loss = (y * dy).sum() + ((state * dlast).sum() if state_grad else 0)
        loss.backward()
        results.append((y, state, {k: v.grad for k, v in x.items()}))
    (y, state, grads), (y_ref, state_ref, grads_ref) = results
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, "y")
    if last:
        assert_close(state, state_ref, "last state")
    if last and backend == "cuda":  # compare the gradients of y alone
        for v in x.values():
            v.grad = None
        y_ref, _ = run(selective_scan_ref, x, full, last, reverse)
        (y_ref * dy).sum().backward()
        grads_ref = {k: v.grad for k, v in x.items()}
        assert not state.requires_grad
    for k in x:
        assert_close(grads[k], grads_ref[k], f"grad of {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stepwise_decoding_matches_full_scan(backend):
    """Scanning L steps at once == L scans of one step chained through the state (decoding)."""
    if backend == "cuda":
        pytest.skip("the cuda backend cannot start from an initial state")
    x, _ = make_inputs(2, 6, 16, 9, True, True, DEVICE[backend])
    x = {k: v.detach() for k, v in x.items()}
    y, state = selective_scan(**x, delta_softplus=True, return_last_state=True, backend=backend)
    h, ys = x["initial_state"], []
    for t in range(9):
        step = {k: v[..., t:t + 1] if k in ("u", "delta", "z", "B", "C") else v for k, v in x.items()}
        step["initial_state"] = h
        y_t, h = selective_scan(**step, delta_softplus=True, return_last_state=True, backend=backend)
        ys.append(y_t)
    assert_close(torch.cat(ys, -1), y, "stepwise y")
    assert_close(h, state, "stepwise last state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend):
    """bf16 in: computed in fp32, y in bf16, each gradient in its input's dtype, close to fp32."""
    x, g = make_inputs(2, 6, 16, 40, True, False, DEVICE[backend], dtype=torch.bfloat16)
    dy = torch.randn(2, 6, 40, generator=g).to(DEVICE[backend])
    x32 = {k: v.detach().float().requires_grad_() for k, v in x.items()}
    y = selective_scan(**x, delta_softplus=True, backend=backend)
    y_ref = selective_scan_ref(**x32, delta_softplus=True)
    (y.float() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), y_ref, "bf16 y", rtol=2e-2, atol=2e-2)
    for k in x:
        assert x[k].grad.dtype == torch.bfloat16, k
        assert_close(x[k].grad.float(), x32[k].grad, f"bf16 grad of {k}", rtol=5e-2, atol=3e-2)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cpu_backend_runs_on_cuda_tensors():
    """The cpu backend is plain torch: it must also run (and agree) on CUDA tensors."""
    x, g = make_inputs(2, 6, 16, 30, True, True, "cuda")
    y, state = selective_scan(**x, delta_softplus=True, return_last_state=True, backend="cpu")
    y_ref, state_ref = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert y.is_cuda
    assert_close(y, y_ref, "y on cuda")
    assert_close(state, state_ref, "last state on cuda")
    dy = torch.randn(2, 6, 30, generator=g).to("cuda")
    grads = torch.autograd.grad((y * dy).sum(), list(x.values()))
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), list(x.values()))
    for k, a, e in zip(x, grads, grads_ref):
        assert_close(a, e, f"grad of {k} on cuda")


@pytest.mark.parametrize("full,init,last", [(False, False, False), (True, True, True)], ids=["plain", "all"])
@pytest.mark.parametrize("seg_steps", [1, 12, 40])
def test_chunked_across_segments(monkeypatch, seg_steps, full, init, last):
    """scan_chunked keeps states only at segment boundaries: make L=53 span several segments (of 1,
    12 or 40 steps: uneven last segments, padded chunks, a segment of one step)."""
    scan_chunked = pytest.importorskip("mambapeft.ops.scan_chunked")
    monkeypatch.setattr(scan_chunked, "SEG_BYTES", seg_steps * 4 * 2 * 16 * 6)  # b=2, N=16, E=6
    test_matches_reference("chunked", 16, 53, full, last, init, reverse=False)

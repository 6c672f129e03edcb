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
from mambapeft.ops.scan import cuda_ext_available, resolve_backend, selective_scan  # noqa: E402
from mambapeft.ops.scan_ref import selective_scan_ref  # noqa: E402
from scan_checks import INPUT_SETS, assert_close, check_against_mamba_ssm, check_against_reference  # noqa: E402
from scan_checks import check_split  # noqa: E402
from scan_checks import make_inputs as _make_inputs  # noqa: E402

if not HAS_CUDA and not scan_triton.INTERPRET:
    pytest.skip("no CUDA, and TRITON_INTERPRET was set to something other than 1", allow_module_level=True)

scan_triton.vectorize_interpreter_scan()  # same results, seconds instead of minutes under the interpreter
DEVICE = "cuda" if HAS_CUDA else "cpu"


def make_inputs(*a, **kw):
    return _make_inputs(*a, device=DEVICE, **kw)


def check(*a, **kw):
    check_against_reference(scan_triton.selective_scan_triton, *a, device=DEVICE, **kw)


# (E, N, L): one step; a ragged tail after one tile; several tiles with a ragged tail; E and N that
# are not powers of two (masked channels and state columns)
CASES = [(8, 4, 1), (16, 16, 63), (16, 8, 200), (12, 5, 70)]


@pytest.mark.parametrize("E,N,L", CASES, ids=[f"E{e}N{n}L{t}" for e, n, t in CASES])
@INPUT_SETS
def test_matches_reference(E, N, L, full, init, last):
    check(2, E, N, L, full, init, last)


@pytest.mark.parametrize("L", [1, 63, 200])
def test_bf16_inputs(L):
    """bf16 u, delta, z, B, C: state and sums in fp32, y and their gradients in bf16."""
    check(2, 16, 16, L, True, True, True, dtype=torch.bfloat16, tol=2e-2)


def test_tile_sizes(monkeypatch):
    """Other blocks: channels spread over several programs of 4, tiles of 8 steps (7 tiles + a tail)."""
    monkeypatch.setattr(scan_triton, "OVERRIDE", scan_triton.Config(4, 4, 4, 4, 8))
    check(2, 12, 16, 61, True, True, True)


@pytest.mark.parametrize("split", [3, 40])
def test_prefill_split(split):
    """Scanning [0, split) and then the rest from its last state = scanning the whole (scan_checks)."""
    check_split(scan_triton.selective_scan_triton, split, 100, device=DEVICE)


def test_backend_registered():
    """selective_scan(backend="triton") runs this scan; auto picks it for an initial state on CUDA where our
    CUDA scan (which also starts from a state) did not build."""
    x, _ = make_inputs(1, 8, 4, 20, True, True)
    x = {k: v.detach() for k, v in x.items()}
    y = selective_scan(**x, delta_softplus=True, backend="triton")
    assert_close(y, selective_scan_ref(**x, delta_softplus=True), "y", 1e-5)
    if HAS_CUDA:
        assert resolve_backend(x["u"], None, x["initial_state"]) == ("cuda_ext" if cuda_ext_available() else "triton")


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
    check(2, E, 16, L, True, True, True, dtype=dtype, tol=2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_matches_mamba_ssm():
    """Same y and gradients as mamba_ssm's selective_scan_fn (bf16, no initial state) at the 130m shape."""
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    check_against_mamba_ssm(scan_triton.selective_scan_triton, 1024, DEVICE)

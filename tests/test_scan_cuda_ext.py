"""Our CUDA scan (ops/scan_cuda_ext.py, ops/csrc/) against the reference recurrence and mamba_ssm's kernel:
outputs, last state and the gradient of every input, the initial state and a last state used in the
loss included, at every chunk configuration (one chunk of 256, 512, 1024 steps; several of 2048),
ragged and vector-loaded rows. Needs CUDA and nvcc (the extension is built on first use); the wiring
of the fused inner function around it is checked on the CPU in test_mamba_inner.py."""
import pytest
import torch
from scan_checks import (INPUT_SETS, assert_close, check_against_mamba_ssm, check_against_reference, check_split,
                         make_inputs, scan_and_grads)

from mambapeft.ops import scan_cuda_ext
from mambapeft.ops.scan import resolve_backend, selective_scan
from mambapeft.ops.scan_ref import selective_scan_ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module", autouse=True)
def built():
    if not scan_cuda_ext.available():
        pytest.skip(f"our CUDA scan is unavailable: {scan_cuda_ext.why_unavailable()}")


@pytest.fixture(params=["block", "lanes"])
def kernels(request, monkeypatch):
    """Each layout of the kernels, forward and backward (the block scan; threads along channels and states),
    whichever "auto" would pick here. The lanes kernels take 1, 2, 4 or 8 threads a channel for N <= 4, 8,
    16, 32, and 4 threads of 6 states for 17 to 24 (lanes_wide in csrc/scan.h): CASES has each."""
    monkeypatch.setattr(scan_cuda_ext, "forward_kernel", request.param)
    monkeypatch.setattr(scan_cuda_ext, "backward_kernel", request.param)
    return request.param


def check(*a, **kw):
    check_against_reference(scan_cuda_ext.selective_scan_cuda_ext, *a, device="cuda", **kw)


# (E, N, L): one step; ragged tails in each one-chunk configuration (32, 256, 512, 1024 steps); a full
# 1024 chunk (vector loads); several 2048-step chunks, ragged and full; E and N not powers of two; for
# the lanes kernels, partial blocks of channels, ragged stages and lengths that are not whole 4-step groups
CASES = [(8, 4, 1), (8, 16, 3), (16, 16, 63), (16, 8, 256), (12, 5, 300), (24, 16, 1000), (32, 16, 1024), (8, 6, 2085),
         (16, 16, 4096), (40, 17, 300), (40, 22, 300), (40, 27, 300)]


@pytest.mark.parametrize("E,N,L", CASES, ids=[f"E{e}N{n}L{t}" for e, n, t in CASES])
@INPUT_SETS
def test_matches_reference(E, N, L, full, init, last, kernels):
    check(2, E, N, L, full, init, last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("L", [1, 200, 1024, 2085])
def test_half_inputs(L, dtype, kernels):
    """u, delta, z, B, C in 16 bits: state and sums in fp32, y and their gradients in the input dtype."""
    check(2, 16, 16, L, True, True, True, dtype=dtype, tol=2e-2)


def test_offset_rows_and_strides(kernels):
    """Time-contiguous views that start 3 steps into a longer row (not 16-byte aligned: scalar loads)
    and B, C with a state stride of b * L (the fused function's layout) = contiguous copies (fp32, so
    that the order of dB's and dC's atomic sums is all that may differ)."""
    b, E, N, L = 2, 32, 16, 1024
    x, g = make_inputs(b, E, N, L, True, True, torch.float32, "cuda")
    dy = torch.randn(b, E, L, generator=g).cuda()
    dlast = torch.randn(b, E, N, generator=g).cuda()
    ref = scan_and_grads(scan_cuda_ext.selective_scan_cuda_ext, x, dy, dlast, True)

    def offset(t):
        big = t.new_zeros(*t.shape[:-1], L + 3)
        big[..., 3:] = t
        return big[..., 3:]

    def state_major(t):   # (b, N, L) with (N, b, L) memory
        return t.detach().permute(1, 0, 2).contiguous().permute(1, 0, 2)
    y = {k: (offset(v.detach()) if k in ("u", "delta", "z") else state_major(v) if k in ("B", "C") else v.detach())
         .requires_grad_() for k, v in x.items()}
    out = scan_and_grads(scan_cuda_ext.selective_scan_cuda_ext, y, dy, dlast, True)
    assert_close(out[0], ref[0], "y", 1e-6)
    assert_close(out[1], ref[1], "last state", 1e-6)
    for k in x:
        assert_close(out[2][k], ref[2][k], f"grad of {k}", 1e-5)


@pytest.mark.parametrize("split", [3, 700])
def test_prefill_split(split, kernels):
    """Scanning [0, split) and then the rest from its last state = scanning the whole (scan_checks)."""
    check_split(scan_cuda_ext.selective_scan_cuda_ext, split, 1027, E=32, device="cuda")


def test_backend_registered():
    """selective_scan(backend="cuda_ext") runs this scan; auto picks it for an initial state on CUDA."""
    x, _ = make_inputs(1, 8, 4, 20, True, True, device="cuda")
    x = {k: v.detach() for k, v in x.items()}
    y = selective_scan(**x, delta_softplus=True, backend="cuda_ext")
    assert_close(y, selective_scan_ref(**x, delta_softplus=True), "y", 1e-5)
    assert resolve_backend(x["u"], None, x["initial_state"]) == "cuda_ext"


def test_frozen_inputs_get_no_gradient():
    """Only y in the loss (the last state unused), A and D frozen: no gradient for them, one for the rest."""
    x, g = make_inputs(2, 8, 4, 40, True, True, device="cuda")
    x["A"].requires_grad_(False)
    x["D"].requires_grad_(False)
    y = scan_cuda_ext.selective_scan_cuda_ext(**x, delta_softplus=True)
    (y * torch.randn(2, 8, 40, generator=g).cuda()).sum().backward()
    assert x["A"].grad is None and x["D"].grad is None
    assert all(x[k].grad is not None for k in ("u", "delta", "B", "C", "z", "delta_bias", "initial_state"))


@pytest.mark.parametrize("L", [1024, 2048])
def test_matches_mamba_ssm(L, kernels):
    """Same y and gradients as mamba_ssm's selective_scan_fn (bf16, no initial state) at the 130m shape."""
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    check_against_mamba_ssm(scan_cuda_ext.selective_scan_cuda_ext, L)


def kernel_inputs(b, E, N, L, dtype):
    """The kernels' inputs (scan_cuda_ext.prepare) of make_inputs' values with an initial state, and its generator."""
    x, g = make_inputs(b, E, N, L, True, True, dtype, "cuda")
    return scan_cuda_ext.prepare(*(x[k].detach() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                                            "initial_state"))), g


def wide_inputs(N, dtype):
    """The kernels' inputs at a shape where "auto" picks the kernels along channels and states: 8 x 1536
    channels, 3 chunks of 2048 steps and a ragged tail, an initial state."""
    return kernel_inputs(8, 1536, N, 4100, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [3, 8, 16, 22, 32])
def test_forward_kernels_agree(N, dtype, monkeypatch):
    """Threads along channels = the block scan at a shape where "auto" picks them (8 x 1536 channels), with
    an initial state, 3 chunks of 2048 steps and a ragged tail: y and every chunk's end state."""
    x, _ = wide_inputs(N, dtype)
    out = {}
    for kernel in ("block", "lanes", "auto"):
        monkeypatch.setattr(scan_cuda_ext, "forward_kernel", kernel)
        out[kernel] = scan_cuda_ext.scan_fwd(*x[:8], True, x[8])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for kernel in ("lanes", "auto"):
        assert_close(out[kernel][0], out["block"][0], f"y ({kernel})", tol)
        assert_close(out[kernel][1], out["block"][1], f"states ({kernel})", 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [3, 8, 16, 22, 32])
def test_backward_kernels_agree(N, dtype, monkeypatch):
    """The backward along channels and states = the block scan's at a shape where "auto" picks it (8 x 1536
    channels, 4100 steps), with an initial state and a last state in the loss: every gradient."""
    x, g = wide_inputs(N, dtype)
    b, E, L = x[0].shape
    _, states = scan_cuda_ext.scan_fwd(*x[:8], True, x[8], want_y=False)
    dout = torch.randn(b, E, L, generator=g).cuda().to(dtype)
    dlast = torch.randn(b, E, N, generator=g).cuda()
    out = {}
    for kernel in ("block", "lanes", "auto"):
        monkeypatch.setattr(scan_cuda_ext, "backward_kernel", kernel)
        out[kernel] = scan_cuda_ext.scan_bwd(*x[:8], True, x[8], states, dout, dlast, want_out_z=True)
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias", "dinitial_state", "dz", "out_z")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for kernel in ("lanes", "auto"):
        for name, got, want in zip(names, out[kernel], out["block"]):
            assert_close(got, want, f"{name} ({kernel})", tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [17, 22, 24])
@pytest.mark.parametrize("L,pieces", [(63, 2), (300, 3), (1024, 4)])
def test_backward_in_pieces(L, pieces, N, dtype, monkeypatch):
    """The lanes backward in pieces of time (csrc/scan.h: lanes_pieces; 4 threads of 6 states): every item
    starts from the forward's state before its piece and the gradient carried from the next piece's item;
    against the reference, with ragged last pieces, an initial state and a last state in the loss."""
    monkeypatch.setattr(scan_cuda_ext, "forward_kernel", "lanes")
    monkeypatch.setattr(scan_cuda_ext, "backward_kernel", "lanes")
    monkeypatch.setattr(scan_cuda_ext, "backward_pieces", pieces)
    x, _ = kernel_inputs(2, 40, N, L, dtype)
    states = scan_cuda_ext.scan_fwd(*x[:8], True, x[8])[1]
    assert states.shape[2] == pieces, "the forward keeps a state a piece"
    check(2, 40, N, L, True, True, True, dtype=dtype, tol=2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("N", [16, 22])
def test_backward_where_blocks_overflow(N, monkeypatch):
    """At the mamba-1.4b training shape (4 x 4096 channels: more blocks of 4 threads of 6 states than the GPU holds
    at once) "auto" runs the 22-state backward in pieces, the 16-state one (4 blocks an SM) whole; both, and the
    22 states whole in two waves (backward_pieces = 1), give the block scan's gradients."""
    b, E, L = 4, 4096, 512
    x, g = kernel_inputs(b, E, N, L, torch.bfloat16)
    dout = torch.randn(b, E, L, generator=g).cuda().to(torch.bfloat16)
    dlast = torch.randn(b, E, N, generator=g).cuda()
    out, kept = {}, {}
    for pieces, kernel in ((0, "auto"), (1, "auto"), (0, "block")):
        monkeypatch.setattr(scan_cuda_ext, "backward_pieces", pieces)
        monkeypatch.setattr(scan_cuda_ext, "backward_kernel", kernel)
        _, kept[pieces, kernel] = scan_cuda_ext.scan_fwd(*x[:8], True, x[8], want_y=False)
        out[pieces, kernel] = scan_cuda_ext.scan_bwd(*x[:8], True, x[8], kept[pieces, kernel], dout, dlast,
                                                     want_out_z=True)
    places = 3 * torch.cuda.get_device_properties(0).multi_processor_count
    assert kept[0, "auto"].shape[2] == (2 if N == 22 and b * E // 32 > places else 1), "pieces where they help"
    assert kept[1, "auto"].shape[2] == kept[0, "block"].shape[2] == 1
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias", "dinitial_state", "dz", "out_z")
    for run in ((0, "auto"), (1, "auto")):
        for name, got, want in zip(names, out[run], out[0, "block"]):
            assert_close(got, want, f"{name} {run}", 2e-2)

"""Our selective scan as a CUDA extension (csrc/): forward and backward from an initial state, to a last
state, both carrying gradient. Built on first use with torch.utils.cpp_extension (it needs the CUDA
toolkit's nvcc; about a minute, then cached by torch per source version).

Same call and semantics as every backend (see scan_ref.py): u, delta, z (b, E, L); A (E, N) real;
B, C (b, N, L) (one group); D, delta_bias (E,); initial_state and the last state (b, E, N) fp32.
u, delta, B, C and z are read in u's dtype (fp32, bf16 or fp16), with time contiguous and any other
strides; the state and every sum are fp32.

Why it exists: mamba_ssm's kernel takes no initial state. Affix tokens as a prefill need one; the
carried correction (scan_carry.py) cost about 0.7 ms a layer at the mamba-130m shape and the Triton
scan is 4x slower than mamba_ssm's (bench/results/issue13/). Here the initial state is just where the
first chunk's scan starts.

Entry points: `selective_scan_cuda_ext` (the backend, autograd), and `scan_fwd` / `scan_bwd` without
autograd for a fused Function that runs the scan inside its own forward and backward (mamba_inner.py).
"""
import functools
import logging
import os
from pathlib import Path

import torch

from .scan_common import input_grads, keep_dtypes

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("scan_binding.cpp", "scan_f32.cu", "scan_bf16.cu", "scan_f16.cu")
log = logging.getLogger(__name__)


def build(name="mambapeft_scan", defines=(), csrc=CSRC):
    """Build (or load torch's cached build of) the extension; `defines` ("NAME=value") set the kernels'
    tuning knobs (csrc/scan.h; bench/sweep_scan_ext.py), each set under its own name. The binding gets them
    too: it sizes the backward's scratch by them. `csrc`: another version's sources, for benchmarks."""
    from torch.utils.cpp_extension import load
    flags = [f"-D{d}" for d in defines]
    return load(name=name, sources=[str(Path(csrc) / s) for s in SOURCES], extra_cflags=["-O3"] + flags,
                extra_cuda_cflags=["-O3", "--use_fast_math"] + flags,
                verbose=os.environ.get("MAMBAPEFT_BUILD_VERBOSE") == "1")


@functools.cache
def extension():
    """The built module; raises (ImportError, OSError, RuntimeError) where it cannot be built."""
    log.info("loading mambapeft's CUDA scan (built on its first use on a machine: about a minute)")
    return build()


@functools.cache
def _build_error():
    try:
        extension()
    except Exception as e:  # noqa: BLE001 - no nvcc, no compiler, a failed build: the scan is unavailable
        log.warning("mambapeft's CUDA scan is unavailable (%s)", _first_line(e))
        return e
    return None


def available():
    """A CUDA device and the extension builds (tried once per process)."""
    return torch.cuda.is_available() and _build_error() is None


def why_unavailable():
    """Why available() is False, in words (None when it is True)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    err = _build_error()
    return None if err is None else _first_line(err)


def _first_line(err):
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def _flat_empty(b, E, L, like):
    """(b, E, L) with (E, b*L) memory: the layout our fused inner function keeps its rows in."""
    return torch.empty(E, b, L, dtype=like.dtype, device=like.device).permute(1, 0, 2)


def prepare(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None):
    """What the kernels read: u, delta, B, C, z in u's dtype with time contiguous; A, D, delta_bias and
    the initial state contiguous fp32."""
    def seq(x):
        x = x.to(u.dtype)
        return x if x.stride(-1) == 1 else x.contiguous()
    f32 = [x.float().contiguous() if x is not None else None for x in (A, D, delta_bias, initial_state)]
    return (seq(u), seq(delta), f32[0], seq(B), seq(C), f32[1], seq(z) if z is not None else None, f32[2], f32[3])


# The forward and the backward kernel: "auto" (threads along channels and states, each walking time, where
# batch * channels fill the GPU and N <= 32; else the block scan along time), or either by name ("lanes"
# beyond 32 states runs the block scan). Tests hold both against the reference; bench/sweep_scan_ext.py
# times them.
KERNELS = {"auto": 0, "block": 1, "lanes": 2}
forward_kernel = "auto"
backward_kernel = "auto"
# The lanes backward's pieces of time (csrc/scan.h: lanes_pieces), where its blocks overflow what the GPU holds
# at once: 0 the launcher's choice, 1 none, k that many (tests). The forward keeps a state a piece for it.
backward_pieces = 0


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, want_y=True):
    """-> y (b, E, L) in u's dtype, gated (or None without want_y), and the states at the chunks' (or the
    backward's pieces') ends (b, E, chunks, N) fp32, the last of which is the last state; inputs as prepare()
    returns them. scan_bwd reads the pieces, if any, from the states' shape."""
    b, E, L = u.shape
    ext = extension()
    n = ext.n_states(b, E, A.shape[1], L, KERNELS[forward_kernel], KERNELS[backward_kernel], backward_pieces)
    states = torch.empty(b, E, n, A.shape[1], dtype=torch.float32, device=u.device)
    y = _flat_empty(b, E, L, u) if want_y else None
    ext.fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, y, states,
            KERNELS[forward_kernel])
    return y, states


def scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, states, dout, dlast,
             dz=None, want_out_z=False, du=None, ddelta=None):
    """The gradients of sum(y * dout) + sum(last * dlast) (dout or dlast may be None: zero), from the
    forward's `states`. -> du, ddelta (u's dtype), dA, dB, dC (b, N, L), dD, ddelta_bias, dinitial_state
    (fp32), dz and the gated output again (with want_out_z, else None). dD, ddelta_bias and dz are
    None without D, delta_bias and z. du, ddelta and dz are written into the given (b, E, L) views
    (time contiguous), else into new ones."""
    b, E, L = u.shape
    N = A.shape[1]
    f32 = {"dtype": torch.float32, "device": u.device}
    du = _flat_empty(b, E, L, u) if du is None else du
    ddelta = _flat_empty(b, E, L, u) if ddelta is None else ddelta
    dA = torch.zeros(E, N, **f32)
    dB, dC = torch.zeros(2, b, N, L, **f32)
    dD = torch.zeros(E, **f32) if D is not None else None
    dbias = torch.zeros(E, **f32) if delta_bias is not None else None
    if z is not None and dz is None:
        dz = _flat_empty(b, E, L, u)
    out_z = _flat_empty(b, E, L, u) if want_out_z else None
    dh0 = torch.empty(b, E, N, **f32)
    if dout is not None:
        dout = dout.to(u.dtype)
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dlast = dlast.float().contiguous() if dlast is not None else None
    extension().bwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, states, dout, dlast,
                    du, ddelta, dA, dB, dC, dD, dbias, dz if z is not None else None, out_z, dh0,
                    KERNELS[backward_kernel])
    return du, ddelta, dA, dB, dC, dD, dbias, dh0, dz, out_z


class SelectiveScanCudaExt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
        ctx.set_materialize_grads(False)  # dout / dlast are None when unused: skip them
        keep_dtypes(ctx, (u, delta, A, B, C, D, z, delta_bias, initial_state))
        x = prepare(u, delta, A, B, C, D, z, delta_bias, initial_state)
        y, states = scan_fwd(*x[:8], delta_softplus, x[8])
        ctx.save_for_backward(*x, states)
        ctx.softplus = delta_softplus
        return y, states[:, :, -1].clone()   # not a view of what backward reads

    @staticmethod
    def backward(ctx, dout, dlast):
        *x, states = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias, dh0, dz, _ = scan_bwd(*x[:8], ctx.softplus, x[8], states, dout, dlast)
        return input_grads(ctx, (du, ddelta, dA, dB, dC, dD, dz, dbias, None, dh0))


def selective_scan_cuda_ext(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            initial_state=None, return_last_state=False):
    y, last = SelectiveScanCudaExt.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (y, last) if return_last_state else y

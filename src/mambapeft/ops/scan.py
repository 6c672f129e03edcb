"""One entry point for the selective scan; the backend is chosen per call.

Every backend takes the same tensors (see scan_ref.py for the shapes), so a PEFT method that
changes what the mixer composes works the same on all of them.
"""
import os
from contextlib import contextmanager

from .scan_ref import selective_scan_ref

BACKENDS = ("auto", "reference", "cpu", "cuda", "cuda_ext", "chunked", "triton")
_forced = [os.environ.get("MAMBAPEFT_SCAN_BACKEND", "auto")]


def set_scan_backend(name):
    """Force one backend for every scan in this process ("auto" restores the automatic choice)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; expected one of {', '.join(BACKENDS)}")
    _forced[0] = name


@contextmanager
def scan_backend(name):
    old = _forced[0]
    set_scan_backend(name)
    try:
        yield
    finally:
        _forced[0] = old


def _cuda_available():
    try:
        from . import scan_cuda  # noqa: F401
    except ImportError:
        return False
    return scan_cuda.available()


def triton_available():
    try:  # triton is optional: not in the dev extra, absent on CI
        from . import scan_triton
    except ImportError:
        return False
    return scan_triton.available()


def cuda_ext_available():
    from . import scan_cuda_ext   # builds the extension on the first call with CUDA (then cached)
    return scan_cuda_ext.available()


def resolve_backend(u, backend=None, initial_state=None):
    """auto: on CUDA, mamba_ssm's kernel where it can (no initial state), else our CUDA scan (built on
    first use where nvcc is), else the Triton scan, else the chunked torch scan; on CPU the cpu backend."""
    name = backend or _forced[0]
    if name == "auto":
        if not u.is_cuda:
            name = "cpu"
        elif initial_state is None and _cuda_available():
            name = "cuda"
        else:
            name = "cuda_ext" if cuda_ext_available() else "triton" if triton_available() else "chunked"
    return name


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, backend=None):
    """y = scan(u; delta, A, B, C) + D*u, gated by silu(z); optionally also the last state."""
    name = resolve_backend(u, backend, initial_state)
    if name == "reference":
        fn = selective_scan_ref
    elif name == "cpu":
        from .scan_cpu import selective_scan_cpu as fn
    elif name == "chunked":
        from .scan_chunked import selective_scan_chunked as fn
    elif name == "triton":
        from .scan_triton import selective_scan_triton as fn
    elif name == "cuda_ext":
        from .scan_cuda_ext import selective_scan_cuda_ext as fn
    elif name == "cuda":
        if initial_state is not None:
            raise ValueError("the cuda scan backend cannot start from an initial state; use 'chunked'")
        from .scan_cuda import selective_scan_cuda as fn
    else:
        raise ValueError(f"unknown scan backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)

"""The selective scan on mamba_ssm's CUDA kernel (`selective_scan_fn`).

Same call as every backend (see scan_ref.py). The kernel wants u, delta, B, C and z in one dtype
(u's), A, D and the delta bias in fp32, and keeps its state in fp32. It cannot start from an
initial state: decoding uses ops/decode_triton.py instead (models/mixer_cuda.py). Its last
state is an output without gradient (the kernel has no backward for it); the mixer only reads it
to fill a decoding cache, which is detached anyway.
"""
import torch

try:  # the wheel may be absent, or built for another torch / CUDA
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except Exception:  # noqa: BLE001
    selective_scan_fn = None


def available():
    """mamba_ssm's scan kernel imports and a CUDA device is present."""
    return selective_scan_fn is not None and torch.cuda.is_available()


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        initial_state=None, return_last_state=False):
    if initial_state is not None:
        raise ValueError("the cuda scan backend cannot start from an initial state")
    if selective_scan_fn is None:
        raise ImportError("the cuda scan backend needs mamba_ssm (pip install mamba-ssm causal-conv1d)")
    dtype = u.dtype
    delta, B, C = delta.to(dtype), B.to(dtype), C.to(dtype)
    z = z.to(dtype) if z is not None else None
    A = A.float()
    D = D.float() if D is not None else None
    delta_bias = delta_bias.float() if delta_bias is not None else None
    out = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if return_last_state:
        y, last = out
        return y, last.detach().contiguous()   # a strided view of the kernel's scratch, no gradient
    return out

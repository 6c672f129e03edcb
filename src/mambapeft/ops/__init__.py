import contextlib
import importlib

import torch


def cuda_triton(module, t):
    """ops/<module>.py (Triton kernels) for a CUDA tensor t where triton imports, else None: the caller
    then runs its torch path (triton is optional, and absent on CI)."""
    if not t.is_cuda:
        return None
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ImportError:
        return None


def device_of(t):
    """Triton launches on the current CUDA device: make it t's for the launch (a model on cuda:1 in a
    process whose current device is cuda:0)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

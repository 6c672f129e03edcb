import importlib


def cuda_triton(module, t):
    """ops/<module>.py (Triton kernels) for a CUDA tensor t where triton imports, else None: the caller
    then runs its torch path (triton is optional, and absent on CI)."""
    if not t.is_cuda:
        return None
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ImportError:
        return None

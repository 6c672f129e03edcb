"""Host cost of ops.device_of, entered at each Triton launch, against a bare nullcontext (needs CUDA).

    PYTHONPATH=src python3 bench/device_of_cost.py
"""
import contextlib
import time

import torch

from mambapeft.ops import device_of


def per_call(make, n=200_000):
    for _ in range(1000):
        with make():
            pass
    t0 = time.perf_counter()
    for _ in range(n):
        with make():
            pass
    return (time.perf_counter() - t0) / n * 1e6


if __name__ == "__main__":
    t = torch.zeros(4, device="cuda")
    ours, bare = per_call(lambda: device_of(t)), per_call(contextlib.nullcontext)
    print(f"device_of(t)    {ours:.2f} us a call")
    print(f"nullcontext()   {bare:.2f} us a call ({ours / bare:.1f}x)")

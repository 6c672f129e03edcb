"""GPU time of a call, for the kernel benchmarks (bench_carry_gpu.py, sweep_scan_ext.py)."""
import statistics

import torch


def median_ms(fn, iters, warmup=1):
    """The median over `iters` calls of fn's GPU time in ms (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)

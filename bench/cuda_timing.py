"""GPU time of a call, for the kernel benchmarks (bench_carry_gpu.py, sweep_scan_ext.py)."""
import statistics

import torch


def median_ms(fn, iters, warmup=1):
    """The median over `iters` calls of fn's GPU time in ms (CUDA events around each call)."""
    return interleaved_ms({"fn": fn}, iters, warmup)["fn"]


def interleaved_ms(fns, iters, warmup=1):
    """{name: median GPU ms} of the calls in `fns`, made in turn, one call of each per round: clock drift
    during the run then reaches every one of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times[k].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in times.items()}

"""The host side of an eager training step (GPU): cProfile of LoRA_p(X) r64 steps at the mamba-130m
shape, bf16 frozen weights and memory-efficient norms, backward in the calling thread; the step's
time with the backward on autograd's device thread (torch's default) and in the calling thread; the
host's time to issue a step, and a torch profile of one (launches counted, ops by host time).

    python3 bench/profile_step_host.py [--steps 5]
"""
import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_gpu  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = bench_gpu.ours_model(bench_gpu.OURS["lora_X_r64"], frozen_bf16=True, lean_norm=True).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    ids = torch.randint(0, bench_gpu.V, (8, 1024), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    for rnd in range(3):   # backward on autograd's device thread (the default) against the calling thread
        for threads in (True, False):
            torch.autograd.set_multithreading_enabled(threads)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            print(f"round {rnd}: eager step {1e3 * (time.perf_counter() - t0) / args.steps:.1f} ms, backward "
                  f"{'on the device thread' if threads else 'in the calling thread'}")
    torch.autograd.set_multithreading_enabled(False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    print(f"host issue {1e3 * (t1 - t0):.1f} ms a step, then the GPU's drain {1e3 * (time.perf_counter() - t1):.1f} ms")
    launch_profile(step)
    host_profile(step, args.steps)


LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def launch_profile(fn, rows=45):
    """torch.profiler of one call of fn: kernel launches and memsets counted, then ops by host time of their own."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print("launches a step:", sum(e.count for e in ka if e.key in LAUNCHES),
          "memcpy/memset:", sum(e.count for e in ka if e.key.startswith(("cudaMemcpy", "cudaMemset"))))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=55))


def host_profile(fn, n, top=(35, 45)):
    """cProfile n calls of fn (the GPU synchronised at the end) and print the functions with the most
    time of their own, then the most cumulative time."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(top[0])
    pstats.Stats(pr).sort_stats("cumtime").print_stats(top[1])


if __name__ == "__main__":
    main()

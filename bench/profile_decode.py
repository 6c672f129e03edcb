"""Where a decoding step's time goes (GPU): kernels of one eager step, a captured step's replay
time, the host's share (issuing a replay, the kept steps' key), and generate()'s time.

    python3 bench/profile_decode.py [--batches 1,32] [--new-tokens 256]
"""
import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_gpu  # noqa: E402
from mambapeft.models import cuda_graph  # noqa: E402
from mambapeft.models.cache import MambaCache  # noqa: E402
from profile_step_host import host_profile  # noqa: E402


def timed(fn, n=1):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3, out


def issue_time(fn, n):
    """The host's time to issue fn (its GPU work queued, not waited for), ms a call."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    ms = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return ms


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--cprofile", action="store_true", help="also cProfile five eager steps")
    args = ap.parse_args()
    torch.manual_seed(0)
    p = bench_gpu.ours_model({"lora_in_proj": {"r": 8}})
    model = p.merge_and_unload().to(torch.bfloat16).eval()
    for b in map(int, args.batches.split(",")):
        ids = torch.randint(1, bench_gpu.V, (b, 8), device="cuda")
        model.generate(ids, max_new_tokens=4, eos_token_id=-1)
        cache = MambaCache(len(model.backbone.layers))
        ms_prefill, out = timed(lambda: model(ids, cache=cache))
        token = out.logits[:, -1].argmax(-1)[:, None]
        model(token, cache=cache)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(token, cache=cache)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        by = collections.Counter(e.name[:70] for e in kernels)
        gpu_us = sum(e.time_range.elapsed_us() for e in kernels)
        ms_eager, _ = timed(lambda: model(token, cache=cache), 20)
        ms_capture, g = timed(lambda: cuda_graph.GraphStep(model, cache, token))
        ms_replay, _ = timed(lambda: g(token), 200)
        ms_issue = issue_time(lambda: g(token), 50)
        ms_key, _ = timed(lambda: cuda_graph.fingerprint(model), 5)
        ms_gen, _ = timed(lambda: model.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=-1))
        print(f"batch {b}: prefill {ms_prefill:.2f} ms, eager step {ms_eager:.3f} ms, capture {ms_capture:.1f} ms, "
              f"replay {ms_replay:.3f} ms/step, generate({args.new_tokens}) {ms_gen:.1f} ms "
              f"= {ms_gen / args.new_tokens:.3f} ms/token; eager step: {len(kernels)} kernels, "
              f"{gpu_us / 1e3:.3f} ms of kernel time; host: {ms_issue:.3f} ms to issue a replay, "
              f"{ms_key:.2f} ms for the kept steps' key (once a generate() call)")
        for name, n in by.most_common(25):
            print(f"   {n:5d}  {name}")
        if args.cprofile:   # the host side of an eager step, by Python function
            host_profile(lambda: model(token, cache=cache), 5, top=(25, 30))


if __name__ == "__main__":
    main()

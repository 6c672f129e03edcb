"""Selective scan on a GPU without the mamba_ssm kernels: the chunked backend against the cpu backend
(plain torch, one launch per step) and the reference loop, forward and forward+backward.

Inputs as a Mamba mixer gives them (delta_softplus, D, z, delta_bias), fp32, all of them requiring
grad. Reports the median time and the peak memory above the inputs (torch.cuda.max_memory_allocated,
gradients included), and the largest difference from the reference relative to each tensor's scale.

    PYTHONPATH=src python bench/bench_scan_gpu.py --b 8 --E 1536 --N 16 --L 1024 --seg-mb 64,256,1024
Appends one JSON line per row to --out/scan_gpu.jsonl and prints the table.
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch

from mambapeft.ops import scan_chunked
from mambapeft.ops.scan import selective_scan

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b, E, N, L, device):
    g = torch.Generator().manual_seed(0)
    xz = torch.randn(b, L, 3 * E, generator=g)
    x = {"u": xz[..., :E].transpose(1, 2), "delta": (xz[..., E:2 * E] * 0.5 - 1.0).transpose(1, 2),
         "A": -torch.exp(torch.rand(E, N, generator=g) * 3), "B": torch.randn(b, N, L, generator=g),
         "C": torch.randn(b, N, L, generator=g), "D": torch.randn(E, generator=g),
         "z": xz[..., 2 * E:].transpose(1, 2), "delta_bias": torch.randn(E, generator=g) * 0.3}
    x = {k: v.to(device).requires_grad_() for k, v in x.items()}
    dy = torch.randn(b, E, L, generator=g).to(device)
    return x, dy


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(backend, x, dy, iters, warmup, device):
    """Median ms of forward and of forward+backward, peak MB above the inputs, and the results."""
    def fwd():
        return selective_scan(**x, delta_softplus=True, backend=backend)

    def fwd_bwd():
        for v in x.values():
            v.grad = None
        y = fwd()
        y.backward(dy)
        return y

    times = {}
    for name, fn in (("fwd", lambda: fwd().detach()), ("fwd_bwd", fwd_bwd)):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(iters):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append((time.perf_counter() - t0) * 1e3)
        times[name] = statistics.median(ts)
    peak = None
    if device.type == "cuda":
        for v in x.values():
            v.grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = fwd_bwd()
        sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        y = fwd_bwd()
    return times, peak, [y.detach()] + [x[k].grad.detach().clone() for k in NAMES]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--E", type=int, default=1536)
    p.add_argument("--N", type=int, default=16)
    p.add_argument("--L", type=int, default=1024)
    p.add_argument("--backends", default="chunked,cpu,reference")
    p.add_argument("--seg-mb", default="", help="extra chunked rows with these SEG_BYTES (MB), e.g. 64,1024")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--ref-iters", type=int, default=2, help="iterations for the (slow) reference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args()
    device = torch.device(a.device)
    x, dy = make_inputs(a.b, a.E, a.N, a.L, device)
    default_seg = scan_chunked.SEG_BYTES
    runs = [(f"{bk} (seg {default_seg >> 20} MB)" if bk == "chunked" else bk, bk, default_seg)
            for bk in a.backends.split(",")]
    runs += [(f"chunked (seg {mb} MB)", "chunked", int(mb) << 20) for mb in a.seg_mb.split(",") if mb]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    head = (f"selective scan fp32, b={a.b} E={a.E} N={a.N} L={a.L}, {dev_name}, torch {torch.__version__}; "
            f"median of {a.iters} ({a.ref_iters} for the reference)")
    print(head)
    print(f"{'':28s}{'fwd ms':>10s}{'fwd+bwd ms':>12s}{'peak MB':>10s}{'max rel diff':>14s}")
    results, ref = {}, None
    for label, bk, seg in runs:
        scan_chunked.SEG_BYTES = seg
        it = a.ref_iters if bk == "reference" else a.iters
        times, peak, outs = measure(bk, x, dy, it, 1, device)
        results[label] = (times, peak, outs)
        if bk == "reference":
            ref = outs
    scan_chunked.SEG_BYTES = default_seg
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "scan_gpu.jsonl"), "a") as f:
        for label, bk, seg in runs:
            times, peak, outs = results[label]
            diff = None
            if ref is not None and bk != "reference":
                diff = max(((o - r).abs().max() / r.abs().max().clamp_min(1.0)).item() for o, r in zip(outs, ref))
            print(f"{label:28s}{times['fwd']:10.2f}{times['fwd_bwd']:12.2f}"
                  f"{'-' if peak is None else f'{peak:.0f}':>10s}{'-' if diff is None else f'{diff:.1e}':>14s}")
            row = {"backend": bk, "label": label, "seg_bytes": seg if bk == "chunked" else None,
                   "b": a.b, "E": a.E, "N": a.N, "L": a.L, "device": dev_name, "torch": torch.__version__,
                   "fwd_ms": times["fwd"], "fwd_bwd_ms": times["fwd_bwd"], "peak_mb": peak,
                   "max_rel_diff": diff, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            f.write(json.dumps(row) + "\n")
    for label, (times, _, _) in results.items():
        if label.startswith("chunked") and "cpu" in results:
            print(f"{label}: {results['cpu'][0]['fwd_bwd'] / times['fwd_bwd']:.1f}x faster than the cpu backend "
                  f"(fwd+bwd)" + (f", {results['reference'][0]['fwd_bwd'] / times['fwd_bwd']:.0f}x than the reference"
                                  if "reference" in results else ""))


if __name__ == "__main__":
    main()

"""Selective scan on a GPU without the mamba_ssm kernels: the chunked backend against the cpu backend
(plain torch, one launch per step) and the reference loop, forward and forward+backward.
With --triton: the Triton scan (ops/scan_triton.py) against mamba_ssm's selective_scan_fn instead.

Inputs as a Mamba mixer gives them (delta_softplus, D, z, delta_bias), fp32, all of them requiring
grad. Reports the median time and the peak memory above the inputs (torch.cuda.max_memory_allocated,
gradients included), and the largest difference from the reference relative to each tensor's scale.

    PYTHONPATH=src python bench/bench_scan_gpu.py --b 8 --E 1536 --N 16 --L 1024 --seg-mb 64,256,1024
Appends one JSON line per row to --out/scan_gpu.jsonl and prints the table.

--triton: bf16 inputs, forward+backward of our scans (--ours: the Triton scan, ops/scan_triton.py, and
the CUDA extension, ops/scan_cuda_ext.py) and of mamba_ssm's kernel on the same tensors, ratios from
one run. A shape "b,E,N,L+n" is affix tuning with n tokens: mamba_ssm scans L+n steps (past 1024 its
2048-step template); each of our scans does the n tokens, then L steps from their last state
(gradients through it), and also L+n in one scan. --triton-sweep adds rows for other Triton block
sizes (ops/scan_triton.py Config: fwd_e,fwd_warps,bwd_e,bwd_warps,t), at the first shape only.

    PYTHONPATH=src python bench/bench_scan_gpu.py --triton --triton-sweep default
    TRITON_INTERPRET=1 PYTHONPATH=src python bench/bench_scan_gpu.py --triton --device cpu \
        --shapes 1,8,4,40+3 --iters 1 --out /tmp     # the CPU check, under Triton's interpreter
Appends to --out/scan_triton_gpu.jsonl.
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


def make_inputs(b, E, N, L, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    xz = torch.randn(b, L, 3 * E, generator=g)
    x = {"u": xz[..., :E].transpose(1, 2), "delta": (xz[..., E:2 * E] * 0.5 - 1.0).transpose(1, 2),
         "A": -torch.exp(torch.rand(E, N, generator=g) * 3), "B": torch.randn(b, N, L, generator=g),
         "C": torch.randn(b, N, L, generator=g), "D": torch.randn(E, generator=g),
         "z": xz[..., 2 * E:].transpose(1, 2), "delta_bias": torch.randn(E, generator=g) * 0.3}
    x = {k: v.to(device, dtype if k in ("u", "delta", "B", "C", "z") else torch.float32).requires_grad_()
         for k, v in x.items()}
    dy = torch.randn(b, E, L, generator=g).to(device)
    return x, dy


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(backend, x, dy, iters, warmup, device):
    """Median ms of forward and of forward+backward, peak MB above the inputs, and the results."""
    return measure_fn(lambda: selective_scan(**x, delta_softplus=True, backend=backend), x, dy, iters, warmup,
                      device)


def measure_fn(fwd, x, dy, iters, warmup, device):
    """measure() for any fwd() -> y over the leaves x."""
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
    return times, peak, [y.detach()] + [x[k].grad.detach().clone() for k in x]


SWEEP = "16,4,8,4,32;16,8,16,8,32;4,4,8,8,32;8,2,8,4,32;8,4,16,8,32;8,4,8,8,16;8,4,8,8,64"


def parse_shape(text):
    """"b,E,N,L" or "b,E,N,L+n" (n affix tokens) -> (b, E, N, L, n)."""
    b, E, N, L = text.split(",")
    L, _, n = L.partition("+")
    return int(b), int(E), int(N), int(L), int(n or 0)


def rel_diff(outs, ref):
    return max(((o.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1.0)).item()
               for o, r in zip(outs, ref))


def bench_triton(a, device):
    """Our scans against mamba_ssm's selective_scan_fn, bf16, fwd and fwd+bwd, at each shape."""
    from mambapeft.ops import scan_cuda, scan_triton
    from mambapeft.ops.scan_triton import Config
    scan_triton.vectorize_interpreter_scan()  # only acts under TRITON_INTERPRET=1 (the CPU check)
    ours = {}
    for name in a.ours.split(","):
        if name == "triton":
            ours[name] = scan_triton.selective_scan_triton
        elif name == "cuda_ext":
            from mambapeft.ops import scan_cuda_ext
            if scan_cuda_ext.available():
                ours[name] = scan_cuda_ext.selective_scan_cuda_ext
            else:
                print(f"our CUDA scan is unavailable here ({scan_cuda_ext.why_unavailable()}): no cuda_ext rows")
        else:
            raise SystemExit(f"--ours: unknown scan {name!r} (expected triton, cuda_ext)")
    has_mamba = scan_cuda.available() and device.type == "cuda"
    if not has_mamba:
        print("mamba_ssm's kernel is not available here: Triton rows only, no ratios")
    sweep = a.triton_sweep.replace("default", SWEEP)
    configs = [None] + [Config(*map(int, c.split(","))) for c in sweep.split(";") if c]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"selective scan bf16 (state fp32), {dev_name}, torch {torch.__version__}; median of {a.iters}")
    print(f"{'':50s}{'fwd ms':>9s}{'fwd+bwd ms':>12s}{'peak MB':>9s}{'vs mamba_ssm':>14s}{'max rel diff':>14s}")
    rows = []
    for k, shape in enumerate(a.shapes.split(";")):
        b, E, N, L, n = parse_shape(shape)
        x, dy = make_inputs(b, E, N, L + n, device, torch.bfloat16)
        base = None
        if has_mamba:
            base = measure_fn(lambda: selective_scan(**x, delta_softplus=True, backend="cuda"), x, dy,
                              a.iters, 2, device)
            rows.append((shape, f"mamba_ssm L={L + n}", None, base, None))

        def prefill(scan):  # the n affix tokens, then L steps from their (differentiable) last state
            pre = {k: v[..., :n] if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
            main = {k: v[..., n:] if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
            y1, h = scan(**pre, delta_softplus=True, return_last_state=True)
            return torch.cat([y1, scan(**main, delta_softplus=True, initial_state=h)], -1)

        for name, scan in ours.items():
            sweep_here = configs if name == "triton" and k == 0 else configs[:1]   # compiles take time
            for cfg in sweep_here:
                scan_triton.OVERRIDE = cfg
                used = scan_triton.config(E, L + n, N) if name == "triton" else None
                tag = name if name != "triton" else f"triton [{'default' if cfg is None else ','.join(map(str, cfg))}]"
                variants = [(f"{tag} L={L + n}", lambda scan=scan: scan(**x, delta_softplus=True))]
                if n:
                    variants.insert(0, (f"{tag} {n} + L={L} from state", lambda scan=scan: prefill(scan)))
                for label, fn in variants:
                    res = measure_fn(fn, x, dy, a.iters, 2, device)
                    rows.append((shape, label, used, res, base))
            scan_triton.OVERRIDE = None
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "scan_triton_gpu.jsonl"), "a") as f:
        for shape, label, used, (times, peak, outs), base in rows:
            ratio = diff = None
            if base is not None:
                ratio = base[0]["fwd_bwd"] / times["fwd_bwd"]
                diff = rel_diff(outs, base[2])
            print(f"{shape + ' ' + label:50s}{times['fwd']:9.2f}{times['fwd_bwd']:12.2f}"
                  f"{'-' if peak is None else f'{peak:.0f}':>9s}{'-' if ratio is None else f'{ratio:.2f}x':>14s}"
                  f"{'-' if diff is None else f'{diff:.1e}':>14s}")
            f.write(json.dumps({"shape": shape, "label": label, "config": used and used._asdict(),
                                "device": dev_name, "torch": torch.__version__, "dtype": "bf16",
                                "fwd_ms": times["fwd"], "fwd_bwd_ms": times["fwd_bwd"], "peak_mb": peak,
                                "mamba_fwd_bwd_over_this": ratio, "max_rel_diff_vs_mamba": diff,
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    print("vs mamba_ssm: mamba_ssm's fwd+bwd ms / this row's (above 1: faster than mamba_ssm); max rel diff: "
          "y and every gradient against mamba_ssm's, relative to each tensor's largest value")


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
    p.add_argument("--triton", action="store_true", help="our scans against mamba_ssm's kernel (bf16)")
    p.add_argument("--ours", default="triton,cuda_ext", help="--triton: which of our scans (triton, cuda_ext)")
    p.add_argument("--shapes", default="8,1536,16,1024;8,1536,16,1024+3;2,4096,16,2048",
                   help="--triton: b,E,N,L[+affix tokens], ';'-separated")
    p.add_argument("--triton-sweep", default="", help="--triton: extra block configs fwd_e,fwd_warps,bwd_e,"
                   "bwd_warps,t ';'-separated ('default' expands to a built-in set)")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.triton:
        return bench_triton(a, device)
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

"""Time the selective scan alone on CPU, forward + backward in fp32.

Compares (a) our cpu backend, (b) the pure-torch recurrent path of transformers' Mamba
(`mamba_selective_scan` without its hub-kernel / mamba_ssm wrapper), (c) our reference recurrence,
on the same inputs (a Mamba mixer's: D, z, delta_bias, softplus). Prints a table and appends one
JSON line to bench/results/scan_cpu.jsonl.

    PYTHONPATH=src python bench/bench_scan.py [--E 1536 --N 16 --L 512 --batch 1]
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mambapeft.ops.scan import selective_scan  # noqa: E402
from mambapeft.ops.scan_ref import selective_scan_ref  # noqa: E402


def transformers_scan():
    """transformers' mamba_selective_scan with the hub-kernel decorators peeled off.

    The decorators only swap in kernels (hub / mamba_ssm); functools.wraps leaves the plain python
    function in __wrapped__. With use_mambapy and use_associative_scan off, it runs the per-step loop.
    """
    from transformers.models.mamba import modeling_mamba
    fn = modeling_mamba.mamba_selective_scan
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    assert fn.__code__.co_filename == modeling_mamba.__file__ and fn.__name__ == "mamba_selective_scan"

    def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=False,
                  use_mambapy=False, use_associative_scan=False)
    return scan


def make_inputs(b, E, N, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = dict(u=torch.randn(b, E, L, generator=g), delta=torch.randn(b, E, L, generator=g) * 0.5 - 2,
             A=-torch.exp(torch.rand(E, N, generator=g) * 2.5), B=torch.randn(b, N, L, generator=g),
             C=torch.randn(b, N, L, generator=g), D=torch.randn(E, generator=g),
             z=torch.randn(b, E, L, generator=g), delta_bias=torch.randn(E, generator=g) * 0.1)
    return {k: v.requires_grad_() for k, v in x.items()}, torch.randn(b, E, L, generator=g)


def time_it(fn, x, dy, repeats, warmup):
    """Median seconds of forward alone (no grad) and of forward + backward; and the output."""
    fwd, both = [], []
    for i in range(warmup + repeats):
        with torch.no_grad():
            t0 = time.perf_counter()
            fn(**x, delta_softplus=True)
            t1 = time.perf_counter()
        for v in x.values():
            v.grad = None
        t2 = time.perf_counter()
        y = fn(**x, delta_softplus=True)
        y.backward(dy)
        t3 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            both.append(t3 - t2)
    return statistics.median(fwd), statistics.median(both), y.detach(), {k: v.grad for k, v in x.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--E", type=int, default=1536, help="channels (d_inner)")
    p.add_argument("--N", type=int, default=16, help="state size")
    p.add_argument("--L", type=int, default=512, help="sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10, help="repeats of our cpu backend")
    p.add_argument("--slow-repeats", type=int, default=3, help="repeats of the reference and transformers")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--chunk-kb", type=lambda v: [int(x) for x in v.split(",")], default=[],
                   help="also time our backend with these chunk sizes (KB), e.g. 768,1536,3072,6144")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scan_cpu.jsonl"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x, dy = make_inputs(args.batch, args.E, args.N, args.L)
    candidates = [("ours (cpu backend)", lambda **kw: selective_scan(**kw, backend="cpu"), args.repeats, 1)]
    if not args.skip_transformers:
        candidates.append(("transformers loop", transformers_scan(), args.slow_repeats, 0))
    candidates.append(("our reference", selective_scan_ref, args.slow_repeats, 0))

    print(f"selective scan, fp32 CPU, batch={args.batch} E={args.E} N={args.N} L={args.L}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"load average before {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    results, outputs = {}, {}
    for name, fn, repeats, warmup in candidates:
        fwd, both, y, grads = time_it(fn, x, dy, repeats, warmup)
        results[name] = {"fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3, "repeats": repeats}
        outputs[name] = (y, grads)

    # all three compute the same thing: report how far each is from ours
    y0, g0 = outputs["ours (cpu backend)"]
    for name, (y, grads) in outputs.items():
        err = [((y - y0).abs().max() / y0.abs().max()).item()]
        err += [((grads[k] - g0[k]).abs().max() / g0[k].abs().max()).item() for k in g0]
        results[name]["max_rel_diff_vs_ours"] = max(err)

    from mambapeft.ops import scan_cpu
    default_kb = scan_cpu.CHUNK_BYTES >> 10
    for kb in args.chunk_kb:  # how the chunk size was chosen
        scan_cpu.CHUNK_BYTES = kb << 10
        T = max(1, min(args.L, scan_cpu.CHUNK_BYTES // (4 * args.batch * args.N * args.E)))
        fwd, both, _, _ = time_it(candidates[0][1], x, dy, args.repeats, 1)
        results[f"ours, chunk {kb} KB (T={T})"] = {"fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3,
                                                   "repeats": args.repeats, "max_rel_diff_vs_ours": None}
    scan_cpu.CHUNK_BYTES = default_kb << 10

    base = results.get("transformers loop", {}).get("fwd_bwd_ms")
    print(f"{'':28s} {'fwd ms':>10s} {'fwd+bwd ms':>12s} {'x faster than tf':>17s} {'max rel diff':>13s}")
    for name, r in results.items():
        ratio = f"{base / r['fwd_bwd_ms']:.1f}" if base else "-"
        diff = "-" if r["max_rel_diff_vs_ours"] is None else f"{r['max_rel_diff_vs_ours']:.1e}"
        print(f"{name:28s} {r['fwd_ms']:10.1f} {r['fwd_bwd_ms']:12.1f} {ratio:>17s} {diff:>13s}")
    if base:
        print(f"ours is {base / results['ours (cpu backend)']['fwd_bwd_ms']:.0f}x faster than transformers "
              "for forward + backward (target: 30x)")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps({"time": datetime.datetime.now().isoformat(timespec="seconds"),
                            "batch": args.batch, "E": args.E, "N": args.N, "L": args.L,
                            "threads": torch.get_num_threads(), "torch": torch.__version__,
                            "loadavg_after": os.getloadavg()[0],
                            "results": results,
                            "speedup_vs_transformers": base / results["ours (cpu backend)"]["fwd_bwd_ms"]
                            if base else None}) + "\n")


if __name__ == "__main__":
    main()

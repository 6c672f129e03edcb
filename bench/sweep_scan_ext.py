"""Our CUDA scan's build-time knobs (ops/csrc/scan_kernels.cuh) against mamba_ssm's kernel, as our fused
inner function calls both: bf16 rows in its layout ((E, b*L) memory, B and C rows of x_proj's output),
no autograd, forward and backward timed apart with CUDA events in one run.

    PYTHONPATH=src python bench/sweep_scan_ext.py --variants "default:;bwd16:MAMBAPEFT_SCAN_ITEMS_BWD=16"

Each variant "label:NAME=value,NAME=value" is built under its own name (in parallel, one process each),
checked against the first variant's results and timed; "label@DIR:..." builds another version's sources
(DIR: its ops/csrc), for a before-and-after in one process. --interleave times them call by call in turn.
Appends to --out/scan_ext_sweep.jsonl.
The two layouts: "block:MAMBAPEFT_SCAN_LANES_MIN=1000000000;lanes:MAMBAPEFT_SCAN_LANES_MIN=0" times the
block scan's forward against the one along channels and states at every shape (the default picks by shape);
MAMBAPEFT_SCAN_LANES_BWD_MIN does the same for the backward.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
from cuda_timing import interleaved_ms, median_ms

from mambapeft.ops import scan_cuda_ext


def parse(variants):
    """[(label, defines, csrc)] of "label[@csrc]:NAME=value,..." items."""
    out = []
    for item in variants.split(";"):
        head, _, defs = item.partition(":")
        label, _, csrc = head.partition("@")
        out.append((label, tuple(d for d in defs.split(",") if d), csrc or str(scan_cuda_ext.CSRC)))
    return out


def build_all(variants):
    """Build every variant in its own process (the builds run in parallel), then load them here."""
    code = ("import sys; from mambapeft.ops import scan_cuda_ext as s; "
            "s.build(sys.argv[1], sys.argv[3:], sys.argv[2])")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"mambapeft_scan_{label}", csrc, *defs])
             for label, defs, csrc in variants]
    if any(p.wait() for p in procs):
        raise SystemExit("a variant failed to build")
    mods = {label: scan_cuda_ext.build(f"mambapeft_scan_{label}", defs, csrc) for label, defs, csrc in variants}
    for m in mods.values():
        if not hasattr(m, "n_states"):   # sources from before the backward's pieces of time: a state a chunk
            m.n_states = lambda b, E, N, L, fk, bk, pieces, m=m: -(-L // m.chunk_size(L))
    return mods


def inputs(b, E, N, L, n_init):
    g = torch.Generator(device="cuda").manual_seed(0)

    def rows(C, scale=1.0, shift=0.0):   # (b, C, L) views of (C, b*L) memory
        return (torch.randn(C, b * L, generator=g, device="cuda") * scale + shift).to(torch.bfloat16) \
            .view(C, b, L).permute(1, 0, 2)
    x = dict(u=rows(E), delta=rows(E, 0.5, -1.0), A=-torch.exp(torch.rand(E, N, generator=g, device="cuda") * 3),
             B=rows(N), C=rows(N), D=torch.randn(E, generator=g, device="cuda"), z=rows(E),
             delta_bias=torch.randn(E, generator=g, device="cuda") * 0.3)
    h0 = torch.randn(b, E, N, generator=g, device="cuda") if n_init else None
    return x, h0, rows(E)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="default:;r96:MAMBAPEFT_SCAN_BWD_REGS=96;"
                   "k16:MAMBAPEFT_SCAN_ITEMS_BWD=16,MAMBAPEFT_SCAN_BWD_REGS=255")
    p.add_argument("--shapes", default="8,1536,16,1024;8,1536,22,1024;4,4096,16,2048")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--interleave", action="store_true",
                   help="time the variants (and mamba_ssm) call by call in turn, not one after another")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args()
    import selective_scan_cuda   # mamba_ssm's extension: the baseline
    variants = parse(a.variants)
    t0 = time.perf_counter()
    mods = build_all(variants)
    print(f"built {len(mods)} variants in {time.perf_counter() - t0:.0f} s; {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; median of {a.iters}{' in turn' if a.interleave else ''}, ms")
    print(f"{'shape':22s}{'variant':18s}{'fwd':>8s}{'bwd':>8s}{'fwd+bwd':>9s}{'mamba_ssm / this':>18s}"
          f"{'max diff':>10s}")
    rows = []
    for shape in a.shapes.split(";"):
        b, E, N, L = map(int, shape.split(","))
        x, h0, dout = inputs(b, E, N, L, True)
        args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        B4, C4 = x["B"].unsqueeze(1), x["C"].unsqueeze(1)
        margs = [x["u"], x["delta"], x["A"], B4, C4, x["D"], x["z"], x["delta_bias"]]
        _, states_m, _ = selective_scan_cuda.fwd(*margs, True)
        dz_m = torch.empty_like(x["z"])
        out_m = selective_scan_cuda.fwd(*margs, True)[0]
        timed = {("mamba_ssm", "fwd"): lambda: selective_scan_cuda.fwd(*margs, True),
                 ("mamba_ssm", "bwd"): lambda: selective_scan_cuda.bwd(*margs, dout, states_m, out_m, dz_m, True,
                                                                       True)}
        first, diffs = None, {}
        for label, _, _ in variants:
            scan_cuda_ext.extension = lambda m=mods[label]: m   # what scan_fwd / scan_bwd call
            y, states = scan_cuda_ext.scan_fwd(*args, True, h0)
            grads = scan_cuda_ext.scan_bwd(*args, True, h0, states, dout, None, want_out_z=True)
            res = [y] + [g for g in grads if g is not None]
            diffs[label] = 0.0 if first is None else max(
                ((r.float() - f.float()).abs().max() / f.float().abs().max().clamp_min(1)).item()
                for r, f in zip(res, first))
            first = first or res

            def on(fn, m=mods[label]):
                def call():
                    scan_cuda_ext.extension = lambda: m
                    return fn()
                return call
            timed[label, "fwd"] = on(lambda: scan_cuda_ext.scan_fwd(*args, True, h0))
            timed[label, "bwd"] = on(lambda st=states: scan_cuda_ext.scan_bwd(*args, True, h0, st, dout, None,
                                                                               want_out_z=True))
        if a.interleave:
            ms = interleaved_ms(timed, a.iters, warmup=3)
        else:
            ms = {k: median_ms(fn, a.iters, warmup=3) for k, fn in timed.items()}
        m_fwd, m_bwd = ms["mamba_ssm", "fwd"], ms["mamba_ssm", "bwd"]
        print(f"{shape:22s}{'mamba_ssm':18s}{m_fwd:8.3f}{m_bwd:8.3f}{m_fwd + m_bwd:9.3f}{'':>18s}{'':>10s}")
        for label, defines, csrc in variants:
            f_ms, b_ms, diff = ms[label, "fwd"], ms[label, "bwd"], diffs[label]
            ratio = (m_fwd + m_bwd) / (f_ms + b_ms)
            print(f"{shape:22s}{label:18s}{f_ms:8.3f}{b_ms:8.3f}{f_ms + b_ms:9.3f}{ratio:17.2f}x{diff:10.1e}")
            rows.append({"shape": shape, "variant": label, "defines": dict(d.split("=") for d in defines), "csrc": csrc,
                         "fwd_ms": f_ms, "bwd_ms": b_ms, "mamba_fwd_ms": m_fwd, "mamba_bwd_ms": m_bwd,
                         "mamba_over_this": ratio, "max_rel_diff_vs_first": diff, "interleaved": a.interleave,
                         "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print("mamba_ssm's backward recomputes out_z too (as ours does with want_out_z); ours starts from an "
          "initial state, mamba_ssm's from zero")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "scan_ext_sweep.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()

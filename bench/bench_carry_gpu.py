"""The affix prefill's carry kernels (ops/scan_carry.py) against the scan they ride on, on one GPU.

For each shape (b, E, N, L), bf16 like training: the median time of carry_fwd and of carry_bwd, and
of mamba_ssm's selective scan forward and backward on the same tensors (the baseline measured in the
same run: the carry's cost as a share of the scan's). --blocks adds rows for other tile configs
(BLOCK_E,BLOCK_T,WARPS); --compare FILE times another version of scan_carry.py (e.g. the previous
commit's, `git show REV:src/mambapeft/ops/scan_carry.py > /tmp/old.py`) on the same inputs and checks
that both give the same results.

    PYTHONPATH=src python bench/bench_carry_gpu.py --blocks 32,64,4;64,64,8;32,128,8 --compare /tmp/old.py
Appends one JSON line per row to --out/carry_gpu.jsonl and prints the table.
"""
import argparse
import importlib.util
import json
import os

import torch

from cuda_timing import median_ms

from mambapeft.ops import scan_carry


def inputs(b, E, N, L, device):
    g = torch.Generator().manual_seed(0)
    bf = {"device": device, "dtype": torch.bfloat16}
    f32 = {"device": device, "dtype": torch.float32}
    x = dict(y0=torch.randn(b, E, L, generator=g).to(**bf), z=torch.randn(b, E, L, generator=g).to(**bf),
             delta=(torch.randn(b, E, L, generator=g) * 0.5 - 2.0).to(**bf),
             delta_bias=(torch.randn(E, generator=g) * 0.3).to(**f32),
             A=(-torch.exp(torch.rand(E, N, generator=g) * 3)).to(**f32),
             C=torch.randn(b, N, L, generator=g).to(**bf), h0=torch.randn(b, E, N, generator=g).to(**f32))
    return x, torch.randn(b, E, L, generator=g).to(**bf)


def time_carry(mod, x, dy, iters):
    dz = torch.empty_like(x["z"])
    fwd = median_ms(lambda: mod.carry_fwd(**x), iters)
    bwd = median_ms(lambda: mod.carry_bwd(dy, x["y0"], x["z"], x["delta"], x["delta_bias"], x["A"], x["C"],
                                          x["h0"], dz), iters)
    return fwd, bwd, (mod.carry_fwd(**x), *mod.carry_bwd(dy, x["y0"], x["z"], x["delta"], x["delta_bias"],
                                                        x["A"], x["C"], x["h0"], dz)[:6])


def time_scan(x, dy, iters):
    import selective_scan_cuda
    b, E, L = x["y0"].shape
    u = x["y0"]
    B = x["C"].unsqueeze(1)
    D = torch.ones(E, device=u.device)
    args = (u, x["delta"], x["A"], B, B, D, None, x["delta_bias"], True)
    fwd = median_ms(lambda: selective_scan_cuda.fwd(*args), iters)
    out, states = selective_scan_cuda.fwd(*args)[:2]
    bwd = median_ms(lambda: selective_scan_cuda.bwd(u, x["delta"], x["A"], B, B, D, None, x["delta_bias"], dy,
                                                   states, None, None, True, False), iters)
    return fwd, bwd


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="8,1536,16,1024;4,4096,16,2048")
    p.add_argument("--blocks", default="", help="extra tile configs BLOCK_E,BLOCK_T,WARPS separated by ;")
    p.add_argument("--compare", default="", help="another scan_carry.py to time and check against")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args()
    other = None
    if a.compare:
        spec = importlib.util.spec_from_file_location("scan_carry_other", a.compare)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
    default = (scan_carry.BLOCK_E, scan_carry.BLOCK_T, scan_carry.WARPS)
    configs = [default] + [tuple(int(v) for v in c.split(",")) for c in a.blocks.split(";") if c]
    rows = []
    for shape in a.shapes.split(";"):
        b, E, N, L = (int(v) for v in shape.split(","))
        x, dy = inputs(b, E, N, L, "cuda")
        try:
            sf, sb = time_scan(x, dy, a.iters)
        except ImportError:
            sf = sb = float("nan")
        ref = None
        for cfg in configs:
            scan_carry.BLOCK_E, scan_carry.BLOCK_T, scan_carry.WARPS = cfg
            f, bw, res = time_carry(scan_carry, x, dy, a.iters)
            ref = res if ref is None else ref
            rows.append({"shape": shape, "kernel": "scan_carry %d,%d,%d" % cfg, "fwd_ms": f, "bwd_ms": bw,
                         "scan_fwd_ms": sf, "scan_bwd_ms": sb})
        scan_carry.BLOCK_E, scan_carry.BLOCK_T, scan_carry.WARPS = default
        if other is not None:
            f, bw, res = time_carry(other, x, dy, a.iters)
            diff = max(float((r.float() - o.float()).abs().max() / o.float().abs().max().clamp_min(1e-12))
                       for r, o in zip(ref, res))
            rows.append({"shape": shape, "kernel": os.path.basename(a.compare), "fwd_ms": f, "bwd_ms": bw,
                         "scan_fwd_ms": sf, "scan_bwd_ms": sb, "max_rel_diff_vs_default": diff})
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "carry_gpu.jsonl"), "a") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "device": torch.cuda.get_device_name()}) + "\n")
    print(f"{'shape':18} {'kernel':22} {'fwd ms':>8} {'bwd ms':>8} {'/scan fwd':>9} {'/scan bwd':>9}")
    for r in rows:
        print(f"{r['shape']:18} {r['kernel']:22} {r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} "
              f"{r['fwd_ms'] / r['scan_fwd_ms']:9.2f} {r['bwd_ms'] / r['scan_bwd_ms']:9.2f}"
              + (f"  rel diff {r['max_rel_diff_vs_default']:.1e}" if "max_rel_diff_vs_default" in r else ""))


if __name__ == "__main__":
    main()

"""Could Additional-scan's new states be scanned apart from the model's own? Our CUDA scan's forward and
backward at 16 states (LoRA_p(X)'s), at 16 + n' (Additional-scan's) in one call, and as two calls of 16
and n' states: in turn, and on two CUDA streams at once (what a split would run). bf16, CUDA events.

    PYTHONPATH=src:bench python bench/scan_state_split.py --shape 8,1536,1024 --extra 6

The split's two calls are ungated (the gate would be applied to their sum); the others gated as the fused
inner function calls them. The last column is each line's time over the one call of 16 + n' states.
"""
import argparse

import torch
from cuda_timing import median_ms
from sweep_scan_ext import inputs

from mambapeft.ops import scan_cuda_ext


def calls(b, E, L, N, gate=True, D=True):
    """-> (forward, backward) of one scan of N states; inputs as sweep_scan_ext makes them."""
    x, _, dout = inputs(b, E, N, L, False)
    args = [x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"] if D else None, x["z"] if gate else None,
            x["delta_bias"]]
    _, states = scan_cuda_ext.scan_fwd(*args, True, None)
    return (lambda: scan_cuda_ext.scan_fwd(*args, True, None),
            lambda: scan_cuda_ext.scan_bwd(*args, True, None, states, dout, None))


def two_streams(f1, f2):
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()

    def run():
        side.wait_stream(main)
        f1()
        with torch.cuda.stream(side):
            f2()
        main.wait_stream(side)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="8,1536,1024", help="batch,channels,length")
    p.add_argument("--extra", type=int, default=6, help="n', the new states")
    p.add_argument("--iters", type=int, default=30)
    a = p.parse_args()
    b, E, L = map(int, a.shape.split(","))
    N, n = 16, a.extra
    base, whole = calls(b, E, L, N), calls(b, E, L, N + n)
    own, new = calls(b, E, L, N, gate=False), calls(b, E, L, n, gate=False, D=False)
    rows = [(f"{N} states (LoRA_p(X)'s)", *base), (f"{N + n} states, one call", *whole),
            (f"{N} ungated", *own), (f"{n} ungated, no D", *new),
            (f"{N} + {n}, in turn", lambda: (own[0](), new[0]()), lambda: (own[1](), new[1]())),
            (f"{N} + {n}, two streams", two_streams(own[0], new[0]), two_streams(own[1], new[1]))]
    print(f"{torch.cuda.get_device_name()}, {b}x{E}x{L} bf16, median of {a.iters}, ms")
    print(f"{'':26s}{'fwd':>8s}{'bwd':>8s}{'sum':>8s}{f'/ {N + n} states':>16s}")
    times = [(label, median_ms(f, a.iters, warmup=5), median_ms(bw, a.iters, warmup=5)) for label, f, bw in rows]
    ref = times[1][1] + times[1][2]
    for label, f, bw in times:
        print(f"{label:26s}{f:8.3f}{bw:8.3f}{f + bw:8.3f}{(f + bw) / ref:15.2f}x")


if __name__ == "__main__":
    main()

"""Vim training throughput: images/s and peak memory of one training step (forward, cross-entropy,
backward, clipping, AdamW) at 224x224 for LoRA_p(X) r64, affix (3 tokens, dual), Additional-scan
(n'=6) and full fine-tuning, each with the new head trained, as in the VTAB-1k runs. Full
fine-tuning is the baseline measured in the same run; the ratios are against it.

    PYTHONPATH=src python bench/bench_vim.py                        # CPU: Vim-S, batch 2
    PYTHONPATH=src python bench/bench_vim.py --batch 32 --steps 20  # H200, mamba_ssm kernels, bf16 autocast

CUDA: random Vim-S weights in fp32, bf16 autocast (as the engine trains), peak memory from
torch.cuda.max_memory_allocated (weights, gradients and optimizer state included), the scan
kernel calls of the first step counted (0 would mean the pure-torch path ran).
CPU: fp32; peak memory = the peak resident memory of a process running one step of that method
alone, above its resident memory before the model was built; the timed steps of all methods run in
one process in turn (round robin), so the load of a shared machine hits each alike.
Appends one JSON line per run to --out/vim_train.jsonl (vim_train_cpu.jsonl on CPU) and the table
with its command to the .txt beside it.
"""
import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RUNS = {
    "full": {"full": {}, "head": {}},
    "lora_X_r64": {"lora_X": {"r": 64}, "head": {}},
    "affix_3": {"affix": {"tokens": 3, "dual": True}, "head": {}},
    "additional_scan_6": {"additional_scan": {"states": 6}, "head": {}},
}


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def kernel_counter():
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_gpu import KernelCounter
    return KernelCounter()


class Run:
    """One method on a fresh Vim: model, optimizer and a fixed batch; step() times one training step."""

    def __init__(self, name, args, device):
        from mambapeft.models.config import VimConfig
        from mambapeft.models.vim import VisionMamba
        from mambapeft.peft import get_peft_model
        torch.manual_seed(0)
        self.name, self.device = name, device
        self.config = VimConfig.preset(args.preset, img_size=args.img, num_classes=args.classes,
                                       **({"num_hidden_layers": args.layers} if args.layers else {}))
        self.model = get_peft_model(VisionMamba(self.config).to(device), {"methods": RUNS[name]}).train()
        self.trainable, self.total = self.model.num_parameters()
        self.optimizer = torch.optim.AdamW(self.model.param_groups(1e-3, 1e-4), lr=1e-3)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.images = torch.randn(args.batch, 3, args.img, args.img, device=device)
        self.labels = torch.randint(0, args.classes, (args.batch,), device=device)
        self.times, self.kernel_calls, self.loss = [], None, None

    def step(self, timed=True, count_kernels=False):
        cuda = self.device.type == "cuda"
        counter = kernel_counter() if count_kernels else contextlib.nullcontext()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda), counter:
            loss = F.cross_entropy(self.model(self.images), self.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 5.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - t)
        if count_kernels:
            self.kernel_calls = counter.calls
        self.loss = float(loss.detach())

    def row(self, args, peak_bytes):
        step = statistics.median(self.times)
        return {"bench": "vim_train", "run": self.name, "preset": args.preset, "layers": self.config.num_hidden_layers,
                "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
                "img": args.img, "batch": args.batch, "tokens": self.config.num_patches + 1,
                "threads": torch.get_num_threads(), "torch": torch.__version__, "step_s": step,
                "images_per_s": args.batch / step, "peak_mem_gib": peak_bytes / 2 ** 30, "trainable": self.trainable,
                "total": self.total, "kernel_calls_first_step": self.kernel_calls, "loss": self.loss,
                "steps": len(self.times), "load_average": os.getloadavg()[0]}


def measure_cuda(name, args, device):
    """One run alone on the GPU: its peak memory is its own."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run = Run(name, args, device)
    run.step(timed=False, count_kernels=True)
    for i in range(args.warmup - 1 + args.steps):
        run.step(timed=i >= args.warmup - 1)
    return run.row(args, torch.cuda.max_memory_allocated())


def peak_cpu(name, args):
    """Peak resident memory of one training step of `name` in this (fresh) process, above its
    resident memory before the model was built."""
    rss0 = rss_bytes()
    Run(name, args, torch.device("cpu")).step(timed=False)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0


def measure_cpu(names, args):
    """Memory: each run in its own process. Time: all runs in this process, their steps in turn, so
    that the load of a shared machine changes during the run hits every method alike."""
    peaks = {}
    for name in names:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name]
        peaks[name] = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
    runs = [Run(name, args, torch.device("cpu")) for name in names]
    for i in range(args.warmup + args.steps):
        for run in runs:
            run.step(timed=i >= args.warmup)
    return [run.row(args, peaks[run.name]) for run in runs]


def report(rows):
    base = next(r for r in rows if r["run"] == "full")
    r0 = rows[0]
    lines = [f"Vim {r0['preset']} ({r0['layers']} layers), {r0['img']}x{r0['img']} ({r0['tokens']} tokens), "
             f"batch {r0['batch']}, {r0['device']}, {r0['threads']} threads, median of {r0['steps']} steps, "
             f"load average {r0['load_average']:.1f}",
             f"{'run':<20}{'trainable':>12}{'ms/step':>10}{'images/s':>10}{'vs full':>9}{'peak GiB':>10}{'vs full':>9}"]
    for r in rows:
        lines.append(f"{r['run']:<20}{r['trainable']:>12,d}{r['step_s'] * 1e3:>10.0f}{r['images_per_s']:>10.3g}"
                     f"{r['images_per_s'] / base['images_per_s']:>9.2f}{r['peak_mem_gib']:>10.2f}"
                     f"{r['peak_mem_gib'] / base['peak_mem_gib']:>9.2f}")
    if r0["kernel_calls_first_step"] is not None:
        lines.append("scan kernel calls in the first step: " +
                     ", ".join(f"{r['run']} {r['kernel_calls_first_step']}" for r in rows))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vim-small")
    ap.add_argument("--layers", type=int, help="override the depth (default: the preset's 24)")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch", type=int, help="default: 32 on CUDA, 2 on CPU")
    ap.add_argument("--steps", type=int, help="timed steps (default: 20 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--one", help=argparse.SUPPRESS)   # CPU: print the peak memory of one step of this run
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (32 if device.type == "cuda" else 2)
    args.steps = args.steps or (20 if device.type == "cuda" else 3)
    runs = args.runs.split(",")
    if "full" not in runs:
        runs.insert(0, "full")
    if args.one:
        print(peak_cpu(args.one, args))
        return
    if device.type == "cuda":
        rows = [measure_cuda(name, args, device) for name in runs]
    else:
        rows = measure_cpu(runs, args)
    for r in rows:
        print(json.dumps(r), flush=True)
    text = report(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "vim_train" if device.type == "cuda" else "vim_train_cpu"
    with open(out / f"{stem}.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(out / f"{stem}.txt", "a") as f:
        f.write(f"$ PYTHONPATH=src python bench/bench_vim.py {' '.join(sys.argv[1:])}\n{text}\n\n")


if __name__ == "__main__":
    main()

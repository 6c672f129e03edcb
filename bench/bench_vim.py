"""Vim training throughput: images/s and peak memory of one training step (forward, cross-entropy,
backward, clipping, AdamW) at 224x224 for LoRA_p(X) r64, affix (3 tokens, dual), Additional-scan
(n'=6) and full fine-tuning, each with the new head trained, as in the VTAB-1k runs. Full
fine-tuning is the baseline measured in the same run; the ratios are against it.

    PYTHONPATH=src python bench/bench_vim.py                        # CPU: Vim-S, batch 2
    PYTHONPATH=src python bench/bench_vim.py --batch 32 --steps 20  # H200, mamba_ssm kernels, bf16 autocast

CUDA: random Vim-S weights in fp32, bf16 autocast (as the engine trains), peak memory from
torch.cuda.max_memory_allocated (weights, gradients and optimizer state included), the scan
kernel calls of the first step counted (0 would mean the pure-torch path ran).
CPU: fp32; each run in its own process, peak memory = the process's peak resident memory above
its resident memory before the model was built.
Appends one JSON line per run to --out/vim_train.jsonl (vim_train_cpu.jsonl on CPU) and the table
with its command to the .txt beside it.
"""
import argparse
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


def measure(name, args, device):
    from mambapeft.models.config import VimConfig
    from mambapeft.models.vim import VisionMamba
    from mambapeft.peft import get_peft_model
    torch.manual_seed(0)
    rss0 = rss_bytes()
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = VimConfig.preset(args.preset, img_size=args.img, num_classes=args.classes,
                              **({"num_hidden_layers": args.layers} if args.layers else {}))
    model = get_peft_model(VisionMamba(config).to(device), {"methods": RUNS[name]})
    trainable, total = model.num_parameters()
    optimizer = torch.optim.AdamW(model.param_groups(1e-3, 1e-4), lr=1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    images = torch.randn(args.batch, 3, args.img, args.img, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    model.train()
    times, kernel_calls = [], None
    for i in range(args.warmup + args.steps):
        counter = kernel_counter() if device.type == "cuda" and i == 0 else None
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            if counter is not None:
                with counter:
                    loss = F.cross_entropy(model(images), labels)
                kernel_calls = counter.calls
            else:
                loss = F.cross_entropy(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    return {"bench": "vim_train", "run": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "preset": args.preset, "layers": config.num_hidden_layers, "img": args.img, "batch": args.batch,
            "tokens": config.num_patches + 1, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "step_s": step, "images_per_s": args.batch / step, "peak_mem_gib": peak / 2 ** 30,
            "trainable": trainable, "total": total, "kernel_calls_first_step": kernel_calls,
            "loss": float(loss), "steps": args.steps, "load_average": os.getloadavg()[0]}


def report(rows):
    base = next(r for r in rows if r["run"] == "full")
    r0 = rows[0]
    lines = [f"Vim {r0['preset']} ({r0['layers']} layers), {r0['img']}x{r0['img']} ({r0['tokens']} tokens), "
             f"batch {r0['batch']}, {r0['device']}, {r0['threads']} threads, median of {r0['steps']} steps",
             f"{'run':<20}{'trainable':>12}{'ms/step':>10}{'images/s':>10}{'vs full':>9}{'peak GiB':>10}{'vs full':>9}"]
    for r in rows:
        lines.append(f"{r['run']:<20}{r['trainable']:>12,d}{r['step_s'] * 1e3:>10.0f}{r['images_per_s']:>10.1f}"
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
    ap.add_argument("--one", help=argparse.SUPPRESS)   # CPU: measure this run in this process, print JSON
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (32 if device.type == "cuda" else 2)
    args.steps = args.steps or (20 if device.type == "cuda" else 3)
    runs = args.runs.split(",")
    if "full" not in runs:
        runs.insert(0, "full")
    if args.one:
        print(json.dumps(measure(args.one, args, device)))
        return
    rows = []
    for name in runs:
        if device.type == "cuda":
            rows.append(measure(name, args, device))
        else:  # a fresh process per run, so that its peak resident memory is its own
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
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

"""The training engine's overhead and its data-parallel scaling.

overhead (default): tokens/s of LoRA_p(X) r64 trained through `mambapeft.training.train` against the
bare step of bench/bench_gpu.py (forward with labels, backward, AdamW, zero_grad; nothing else),
same process, same shape, random weights: bare, engine, bare, engine, ..., bare (--rounds engine
runs, each compared with the bare runs on either side; the median is reported). On CUDA the bare
step is bench_gpu.train itself. Both store the frozen weights in bf16 on CUDA, as the engine's
training.frozen_dtype auto does under bf16 autocast.

--ddp N: the engine with one process (micro-batches accumulated) against N processes launched by
torchrun, the same effective batch (N x --batch sequences per step); tokens/s and the largest
difference between the two loss curves.

    PYTHONPATH=src python bench/bench_engine.py --out bench/results                 # one GPU, 130m shape
    PYTHONPATH=src python bench/bench_engine.py --cuda-graph --out bench/results    # the engine on CUDA graphs
    PYTHONPATH=src python bench/bench_engine.py --ddp 2 --out bench/results         # two GPUs (runs torchrun)
    PYTHONPATH=src python bench/bench_engine.py --ddp 2 --cuda-graph --out bench/results   # both on CUDA graphs
    PYTHONPATH=src python bench/bench_engine.py --shape small --out /tmp/b          # CPU check
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"130m": dict(vocab=50280, d=768, layers=24, batch=8, seqlen=1024),
          "small": dict(vocab=512, d=128, layers=2, batch=4, seqlen=128)}
METHODS = {"lora_X": {"r": 64}}


def build_model(s, device):
    from mambapeft.models import MambaConfig, MambaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        return MambaForCausalLM(MambaConfig(vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=s["layers"]))


class RandomTokens:
    """Task: random token sequences (the same for every run), next-token loss over all of them."""
    metric, greater_is_better, unit = "loss", False, "tokens"

    def __init__(self, s, n):
        self.s = s
        self.data = torch.randint(0, s["vocab"], (n, s["seqlen"]), generator=torch.Generator().manual_seed(1))

    def load_model(self, section):
        return build_model(self.s, "cpu")   # the engine moves it to its process's device

    def train_set(self):
        return self.data

    def collate(self, items):
        return {"input_ids": torch.stack(items)}

    def loss(self, model, batch):
        ids = batch["input_ids"]
        count = ids.shape[0] * (ids.shape[1] - 1)
        return model(input_ids=ids, labels=ids).loss.float() * count, count

    def evaluate(self, model, split):
        raise KeyError(split)   # no validation: the benchmark times training alone


def engine_run(s, steps, warmup, batch, micro, out_dir, cuda_graph=False):
    from mambapeft.training import train
    task = RandomTokens(s, batch * (steps + warmup))
    config = {"model": {}, "methods": METHODS, "task": {"type": "bench"}, "output_dir": str(out_dir),
              "training": {"lr": 1e-5, "batch_size": batch, "micro_batch_size": micro, "max_steps": steps + warmup,
                           "eval_every": 0, "save_every": 10 ** 9, "progress": False, "schedule": "constant",
                           "cuda_graph": cuda_graph}}
    train(config, task=task)
    from mambapeft.training import logs
    rec = [r for r in logs.read(Path(out_dir) / "log.jsonl") if "split" not in r]
    times = sorted(r["step_s"] for r in rec[warmup:])
    return {"tokens_per_s": rec[-1]["units"] / times[len(times) // 2], "losses": [r["loss"] for r in rec]}


def bare_run(s, steps, warmup, device):
    """bench_gpu.train's step; on CPU the same loop without CUDA synchronisation."""
    if device == "cuda" and s is SHAPES["130m"]:
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_gpu
        row = bench_gpu.train("bare_lora_X_r64", lambda: bench_gpu.ours_model(METHODS, frozen_bf16=True),
                              s["batch"], s["seqlen"], steps, warmup)
        return {"tokens_per_s": row["tokens_per_s"]}
    from mambapeft.peft import PeftConfig, get_peft_model
    model = get_peft_model(build_model(s, device), PeftConfig(METHODS)).to(device).train()
    if device == "cuda":
        model.cast_frozen(torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seqlen"]), device=device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"tokens_per_s": s["batch"] * s["seqlen"] / sorted(times)[len(times) // 2]}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def overhead(args, s, device):
    """Rounds of bare, engine, ..., bare: each engine run sits between two bare ones, so a drift of
    the machine shows as a gap between bare runs instead of as engine overhead."""
    bare, eng = [bare_run(s, args.steps, args.warmup, device)["tokens_per_s"]], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            eng.append(engine_run(s, args.steps, args.warmup, s["batch"], s["batch"], Path(tmp) / f"run{i}",
                                  args.cuda_graph)["tokens_per_s"])
            bare.append(bare_run(s, args.steps, args.warmup, device)["tokens_per_s"])
    ratios = [e / ((a + b) / 2) for e, a, b in zip(eng, bare, bare[1:])]   # each against its neighbours
    return {"bench": "engine_overhead", "shape": args.shape, "device": device, "methods": METHODS,
            "cuda_graph": args.cuda_graph,
            "batch": s["batch"], "seqlen": s["seqlen"], "steps": args.steps, "rounds": args.rounds,
            "bare_tokens_per_s": bare, "engine_tokens_per_s": eng, "engine_vs_bare_per_round": ratios,
            "engine_vs_bare": sorted(ratios)[len(ratios) // 2]}


def ddp(args, s):
    """Orchestrates: one process with accumulation, then N processes under torchrun."""
    here = [sys.executable, __file__, "--worker", "--shape", args.shape, "--steps", str(args.steps),
            "--warmup", str(args.warmup)] + (["--cuda-graph"] if args.cuda_graph else [])
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for n in (1, args.ddp):
            out = Path(tmp) / f"p{n}"
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)] if n > 1 else []
            cmd = launch + (here[1:] if launch else here) + ["--global-batch", str(args.ddp * s["batch"]),
                                                             "--run-dir", str(out)]
            subprocess.run(cmd, check=True)
            runs[n] = json.loads((out / "bench.json").read_text())
    one, many = runs[1], runs[args.ddp]
    diff = max(abs(a - b) for a, b in zip(one["losses"], many["losses"]))
    return {"bench": "engine_ddp", "shape": args.shape, "processes": args.ddp, "cuda_graph": args.cuda_graph,
            "global_batch": args.ddp * s["batch"],
            "micro_batch": s["batch"], "seqlen": s["seqlen"], "steps": args.steps,
            "tokens_per_s_1": one["tokens_per_s"], f"tokens_per_s_{args.ddp}": many["tokens_per_s"],
            "speedup": many["tokens_per_s"] / one["tokens_per_s"], "max_loss_diff": diff,
            "losses_1": one["losses"], f"losses_{args.ddp}": many["losses"]}


def worker(args, s):
    r = engine_run(s, args.steps, args.warmup, args.global_batch, s["batch"], Path(args.run_dir), args.cuda_graph)
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(args.run_dir) / "bench.json").write_text(json.dumps(r))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="130m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="engine runs, each between two bare runs")
    ap.add_argument("--ddp", type=int, default=0, help="compare 1 process with this many (torchrun)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="the engine's runs with training.cuda_graph (the bare step stays eager; with --ddp, "
                         "both the one-process and the N-process runs)")
    ap.add_argument("--out", help="append the result to OUT/engine_bench.jsonl")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--global-batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    s = SHAPES[args.shape]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        return worker(args, s)
    row = ddp(args, s) if args.ddp else overhead(args, s, device)
    row["command"] = "PYTHONPATH=src python bench/bench_engine.py " + " ".join(sys.argv[1:])
    row["torch"] = torch.__version__
    if device == "cuda":
        row["gpu"] = torch.cuda.get_device_name()
    brief = {k: v for k, v in row.items() if not k.startswith("losses")}
    print(json.dumps(brief, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "engine_bench.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""Training throughput of the "language" task through the engine (`mambapeft train`'s train()) on CPU
with the shipped tiny model: the engine's tokens/s (train_on_inputs, so every real token counts) for
a few PEFT methods, the median over steps after two warm-up steps.

    PYTHONPATH=src python bench/bench_language_train.py
"""
import argparse
import json
import platform
import random
import statistics
import tempfile
from pathlib import Path

import torch

from mambapeft.cli import DEFAULT_MODEL
from mambapeft.training.trainer import train


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--methods", default="lora_X,additional_scan,affix,full")
    ap.add_argument("--jsonl")
    args = ap.parse_args()
    rnd = random.Random(0)
    recs = []
    for _ in range(args.records):   # a few worked sums as the instruction, one sum to answer
        a, b = rnd.randrange(1000), rnd.randrange(1000)
        shots = "".join(f"{x}+{y}={x + y}\n" for x, y in ((rnd.randrange(100), rnd.randrange(100)) for _ in range(4)))
        recs.append({"instruction": shots, "input": f"{a}+{b}=", "output": str(a + b)})
    tmp = Path(tempfile.mkdtemp(prefix="bench-lang-"))
    (tmp / "train.json").write_text(json.dumps(recs))
    print(f"language task through the engine, tiny model, batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    for method in args.methods.split(","):
        config = {"model": DEFAULT_MODEL, "methods": method, "output_dir": str(tmp / method),
                  "task": {"type": "language", "data": str(tmp / "train.json"), "template": "none", "cutoff": 64,
                           "train_on_inputs": True, "validation_size": 16},
                  "training": {"batch_size": args.batch, "max_steps": args.steps, "eval_every": args.steps,
                               "progress": False, "device": "cpu"}}
        train(config)
        steps = [json.loads(line) for line in (tmp / method / "log.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_s"] for r in steps if "tokens_per_s" in r and r["step"] > 2]
        res = {"method": method, "tokens_per_s": statistics.median(rates), "batch": args.batch,
               "tokens_per_record": statistics.mean(len(r["instruction"] + r["input"] + r["output"]) + 1 for r in recs),
               "steps": args.steps, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version()}
        print(f"  {method:16s} {res['tokens_per_s']:9.0f} tokens/s")
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()

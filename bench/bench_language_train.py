"""Training throughput of the "language" task on CPU with the shipped tiny model: tokens per second
(every non-padding token, and the response tokens the loss counts) for a few PEFT methods, through the
task's own train_set / collate / loss (a plain AdamW loop, as the engine runs it per micro-batch).

    PYTHONPATH=src python bench/bench_language_train.py
"""
import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mambapeft.peft import get_peft_model, preset
from mambapeft.training.task import build_task


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--methods", default="lora_X,additional_scan,affix,full")
    ap.add_argument("--jsonl")
    args = ap.parse_args()
    rnd = random.Random(0)
    recs = []
    for _ in range(args.records):   # a few worked sums as the input, one sum to answer
        a, b = rnd.randrange(1000), rnd.randrange(1000)
        shots = "".join(f"{x}+{y}={x + y}\n" for x, y in ((rnd.randrange(100), rnd.randrange(100)) for _ in range(4)))
        recs.append({"instruction": shots, "input": f"{a}+{b}=", "output": str(a + b)})
    path = Path(tempfile.mkdtemp(prefix="bench-lang-")) / "train.json"
    path.write_text(json.dumps(recs))
    task = build_task({"type": "language", "data": str(path), "template": "none", "cutoff": 64,
                       "validation_size": 10})
    base = task.load_model({})
    items = task.train_set()
    print(f"language task, tiny model (D={base.config.hidden_size}, {base.config.num_hidden_layers} layers), "
          f"batch {args.batch}, ~{statistics.mean(len(i) for i, _ in items):.0f} tokens/record, "
          f"{torch.get_num_threads()} threads")
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model = get_peft_model(task.load_model({}), preset(method)).train()
        opt = torch.optim.AdamW(model.param_groups(lr=1e-3))
        times, tokens, counted = [], 0, 0
        for step in range(args.steps + 2):
            batch = task.collate([items[(step * args.batch + i) % len(items)] for i in range(args.batch)])
            t = time.perf_counter()
            total, count = task.loss(model, batch)
            (total / count).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 2:   # two warm-up steps
                times.append(time.perf_counter() - t)
                tokens += int(batch["attention_mask"].sum())
                counted += int(count)
        res = {"method": method, "tokens_per_s": tokens / sum(times), "loss_tokens_per_s": counted / sum(times),
               "ms_per_step": 1000 * statistics.median(times), "batch": args.batch, "steps": args.steps,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
        print(f"  {method:16s} {res['ms_per_step']:8.1f} ms/step  {res['tokens_per_s']:9.0f} tokens/s  "
              f"({res['loss_tokens_per_s']:.0f} response tokens/s)")
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()

"""Training step (forward, backward, AdamW) of a Mamba-1 LM on CPU: mambapeft against
transformers.MambaForCausalLM with the same weights, measured in the same run.

    python bench/bench_train_cpu.py            # D=256, 4 layers, vocab 4096, batch 8 x 256
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from mambapeft.models import MambaConfig, MambaForCausalLM


def median_step(model, ids, steps, warmup=1):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times), out.loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--hf-steps", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_cpu.jsonl"))
    args = ap.parse_args()
    torch.manual_seed(0)
    hf_cfg = transformers.MambaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers)
    hf = transformers.MambaForCausalLM(hf_cfg).train()
    ours = MambaForCausalLM(MambaConfig.from_dict(hf_cfg.to_dict()), init=False).train()
    ours.load_state_dict(hf.state_dict(), strict=False)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    with torch.no_grad():
        diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
    t_ours, loss_ours = median_step(ours, ids, args.steps)
    t_hf, loss_hf = median_step(hf, ids, args.hf_steps)
    tokens = args.batch * args.seq
    row = {"bench": "train_cpu", "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
           "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
           "ours_s": t_ours, "transformers_s": t_hf, "speedup": t_hf / t_ours,
           "ours_tokens_per_s": tokens / t_ours, "transformers_tokens_per_s": tokens / t_hf,
           "max_abs_logit_diff": diff, "first_loss_ours": loss_ours, "first_loss_transformers": loss_hf}
    print(f"training step, D={args.hidden} L={args.layers} V={args.vocab} batch {args.batch}x{args.seq}, "
          f"{torch.get_num_threads()} threads (same weights; max |logit diff| {diff:.1e})")
    print(f"  mambapeft      {t_ours * 1e3:9.1f} ms/step  {tokens / t_ours:9.0f} tokens/s")
    print(f"  transformers   {t_hf * 1e3:9.1f} ms/step  {tokens / t_hf:9.0f} tokens/s")
    print(f"  speedup        {t_hf / t_ours:9.1f}x   (target: >= 10x)")
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""Seconds per optimizer step of the two pretraining models at their default shapes (random data of
the real shapes; forward, backward, AdamW), to predict a `mambapeft pretrain` run's time.

    PYTHONPATH=src python bench/bench_pretrain.py [--device cpu|cuda] [--lm-batch 64] [--vim-batch 256] [--steps 5]
"""
import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from mambapeft.models import MambaConfig, MambaForCausalLM, VimConfig, VisionMamba
from mambapeft.pretrain import images, text


def step_seconds(model, batch_fn, loss_fn, steps, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    times = []
    for i in range(steps + 1):   # the first step (allocations, kernel choice) is not counted
        batch = batch_fn()
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lm-batch", type=int, default=text.DEFAULTS["batch_size"])
    p.add_argument("--vim-batch", type=int, default=images.DEFAULTS["batch_size"])
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    out = {"device": a.device, "threads": torch.get_num_threads()}
    lm = MambaForCausalLM(MambaConfig(**text.SHAPE)).to(a.device)
    T, V = text.DEFAULTS["seq_len"], text.SHAPE["vocab_size"]
    out["lm"] = {"batch": a.lm_batch, "seq_len": T, "median_step_s": step_seconds(
        lm, lambda: torch.randint(0, V, (a.lm_batch, T), device=a.device),
        lambda m, ids: m(ids, labels=ids).loss, a.steps, a.device)}
    vim = VisionMamba(VimConfig(**images.SHAPE, num_classes=20)).to(a.device)
    S = images.SHAPE["img_size"]
    out["vim"] = {"batch": a.vim_batch, "img_size": S, "median_step_s": step_seconds(
        vim, lambda: (torch.randn(a.vim_batch, 3, S, S, device=a.device),
                      torch.randint(0, 20, (a.vim_batch,), device=a.device)),
        lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]), a.steps, a.device)}
    for k, module in (("lm", text), ("vim", images)):   # the training loop of a default run, at the default batch
        if out[k]["batch"] == module.DEFAULTS["batch_size"]:
            out[k]["predicted_train_s"] = round(out[k]["median_step_s"] * module.DEFAULTS["steps"], 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

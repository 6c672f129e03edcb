"""FalconMamba-7B shape (D=4096, 64 layers, vocab 65024, untied head) on one H200, random weights.

Training: bf16 base weights (frozen), fp32 adapters, bf16 autocast, AdamW, median step after warm-up:
tokens/s and peak memory (torch.cuda.max_memory_allocated) of our LoRA_p(X) r64 and Additional-scan
n'=6 against transformers' FalconMambaForCausalLM + peft LoRA(in_proj) r64 on the same kernels. A
batch that does not fit is halved until it does (the row says which ran).

Checks at the 7B width with 2 layers (fp32, same kernels, same code paths):
- which of peft's LoRA adapters on in_proj, x_proj and dt_proj receive gradient in transformers'
  training forward (their lora_B set off zero first, so both factors would get gradient if connected);
  the same for ours (lora_in_proj, lora_x_proj, lora_dt);
- transformers' training forward (mamba_inner_fn with b/c/dt_rms_weight) against its own inference
  forward and against ours: loss, logits and the in_proj LoRA gradient.

    PYTHONPATH=src python bench/bench_falcon.py --out bench/results          # H200: 7B shape
    PYTHONPATH=src python bench/bench_falcon.py --tiny --out /tmp/falcon     # any machine: tiny shape
Writes falcon_bench.jsonl (one line per run) and falcon_bench.txt (the table) under --out.
"""
import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch

TINY = dict(hidden_size=64, num_hidden_layers=2, vocab_size=256)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def shape(args, layers=None):
    from mambapeft.models import MambaConfig
    cfg = MambaConfig.preset("falcon-mamba-7b", **(TINY if args.tiny else {}))
    if layers is not None:
        cfg.num_hidden_layers = layers
    return cfg


def ours(cfg, methods, device, dtype):
    from mambapeft.models import MambaForCausalLM
    from mambapeft.peft import PeftConfig, get_peft_model
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = MambaForCausalLM(cfg)
    return get_peft_model(model, PeftConfig(methods)).to(device)   # adapters in fp32


def hf(cfg, targets, r, device, dtype):
    import peft
    import transformers
    torch.manual_seed(0)
    hcfg = transformers.FalconMambaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                          num_hidden_layers=cfg.num_hidden_layers, state_size=cfg.state_size,
                                          expand=cfg.expand, conv_kernel=cfg.conv_kernel,
                                          tie_word_embeddings=cfg.tie_word_embeddings, mixer_rms_eps=cfg.mixer_rms_eps)
    with torch.device(device), default_dtype(dtype):
        model = transformers.FalconMambaForCausalLM(hcfg)
    return peft.get_peft_model(model, peft.LoraConfig(target_modules=targets, r=r, lora_alpha=r, lora_dropout=0.0))


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train(name, build, cfg, args, device, hf_model=False):
    """Median step of `build()` on the largest batch (from args.batch, halving) that fits."""
    batch = args.batch
    while True:
        free()
        try:
            model = build().train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5)
            ids = torch.randint(0, cfg.vocab_size, (batch, args.seqlen), device=device)
            times, losses = [], []
            for i in range(args.warmup + args.steps):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast(device, torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
                losses.append(loss.item())
            med = sorted(times)[len(times) // 2]
            row = dict(run=name, kind="train", impl="transformers+peft" if hf_model else "mambapeft", batch=batch,
                       seqlen=args.seqlen, steps=args.steps, median_step_s=med,
                       tokens_per_s=batch * args.seqlen / med,
                       peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None,
                       trainable=sum(p.numel() for p in params), first_loss=losses[0], last_loss=losses[-1])
            del model, opt, params, loss
            free()
            return row
        except torch.OutOfMemoryError:
            model = opt = params = loss = None  # noqa: F841  (drop the references before retrying)
            if batch == 1:
                free()
                return dict(run=name, kind="train", batch=0, seqlen=args.seqlen, error="out of memory at batch 1")
            batch //= 2
            print(f"{name}: out of memory, retrying with batch {batch}", file=sys.stderr)


def grad_max(module):
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    if not grads or all(g is None for g in grads):
        return None
    return max(float(g.abs().max()) for g in grads if g is not None)


def checks(args, device):
    """Gradient reach, and transformers' training path against its inference path and against ours
    (fp32, 2 layers of the full width, the same kernels)."""
    from mambapeft.models import MambaForCausalLM
    from mambapeft.peft import PeftConfig, get_peft_model
    from mambapeft.peft.lora import MixerLoRA
    cfg = shape(args, layers=2)
    ids = torch.randint(0, cfg.vocab_size, (1, args.check_seqlen), device=device)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    rows = []

    free()
    model = hf(cfg, ["in_proj", "x_proj", "dt_proj"], 8, device, torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    base = model.base_model.model
    layer = base.backbone.layers[0].mixer
    outs = {}
    for mode in ("train", "eval"):       # eval with gradients on: transformers' inference forward
        model.train(mode == "train")
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs[mode] = dict(loss=out.loss.item(), logits=out.logits.detach(),
                          grad=torch.cat([p.grad.flatten() for n, p in layer.in_proj.named_parameters()
                                          if "lora_" in n]))
        rows.append(dict(run="hf_peft_lora_reach", kind="check", impl="transformers+peft", mode=mode,
                         lora_grad_max={t: grad_max(getattr(layer, t)) for t in ("in_proj", "x_proj", "dt_proj")}))
    tr, ev = outs["train"], outs["eval"]
    with torch.no_grad(), model.disable_adapter():
        model.eval()
        hf_inference = model(input_ids=ids).logits
        model.train()
        hf_training = model(input_ids=ids).logits
    rows.append(dict(run="hf_train_vs_inference", kind="check", impl="transformers", loss_train=tr["loss"],
                     loss_inference=ev["loss"], logits_rel_diff=rel(tr["logits"], ev["logits"]),
                     in_proj_lora_grad_rel_diff=rel(tr["grad"], ev["grad"])))
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    del model, base, layer, outs, tr, ev, out
    free()

    with torch.device(device):
        own = MambaForCausalLM(cfg, init=False)
    own.load_state_dict(state)
    del state
    with torch.no_grad():
        logits = own(ids, return_logits=True).logits
    rows.append(dict(run="ours_vs_hf_base_logits", kind="check", impl="mambapeft",
                     rel_diff_vs_hf_inference=rel(logits, hf_inference),
                     rel_diff_vs_hf_training_forward=rel(logits, hf_training)))
    peft_ours = get_peft_model(own, PeftConfig({"lora_in_proj": {"r": 8}, "lora_x_proj": {"r": 8},
                                                "lora_dt": {"r": 8}})).to(device)
    with torch.no_grad():
        for n, p in own.named_parameters():
            if ".lora.up." in n:
                p.normal_(0, 0.01)
    peft_ours.train()
    peft_ours(ids, labels=ids).loss.backward()
    mixer = own.backbone.layers[0].mixer
    rows.append(dict(run="ours_lora_reach", kind="check", impl="mambapeft", mode="train",
                     lora_grad_max={a.target: grad_max(a) for a in mixer.peft.values() if isinstance(a, MixerLoRA)}))
    del peft_ours, own, mixer, logits, hf_inference, hf_training
    free()
    return rows


def table(rows):
    lines = []
    trains = {r["run"]: r for r in rows if r["kind"] == "train"}
    base = trains.get("hf_peft_lora_in_proj_r64")
    lines.append(f"{'run':<28} {'batch':>5} {'tok/s':>10} {'vs hf':>6} {'peak GiB':>9} {'vs hf':>6} {'trainable':>12}")
    for r in trains.values():
        if "error" in r:
            lines.append(f"{r['run']:<28} {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base and "error" not in base else float("nan")
        mem = r["peak_mem_gib"]
        mem_ratio = mem / base["peak_mem_gib"] if mem is not None and base and base.get("peak_mem_gib") else float("nan")
        lines.append(f"{r['run']:<28} {r['batch']:>5} {r['tokens_per_s']:>10.0f} {ratio:>6.2f} "
                     f"{mem if mem is not None else float('nan'):>9.1f} {mem_ratio:>6.2f} {r['trainable']:>12,}")
    for r in rows:
        if r["kind"] == "check":
            lines.append(json.dumps({k: v for k, v in r.items() if k != "kind"}))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="D=64, 2 layers, vocab 256 (a CPU check of the script)")
    ap.add_argument("--batch", type=int, default=None, help="first batch tried (halved on out of memory)")
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--check-seqlen", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seqlen = args.seqlen or (32 if args.tiny else 2048)
    args.check_seqlen = args.check_seqlen or (32 if args.tiny else 512)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False   # the fp32 checks compare paths, not TF32 rounding
    cfg = shape(args)
    rows = checks(args, device)
    for r in rows:
        print(json.dumps(r), flush=True)
    runs = [("hf_peft_lora_in_proj_r64", lambda: hf(cfg, ["in_proj"], 64, device, torch.bfloat16), True),
            ("lora_X_r64", lambda: ours(cfg, {"lora_X": {"r": 64}}, device, torch.bfloat16), False),
            ("additional_scan_6", lambda: ours(cfg, {"additional_scan": {"states": 6}}, device, torch.bfloat16),
             False)]
    for name, build, is_hf in runs:
        rows.append(train(name, build, cfg, args, device, is_hf))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    cmd = "PYTHONPATH=src python " + " ".join(sys.argv)
    header = (f"# {cmd}\n# device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch "
              f"{torch.__version__}, shape D={cfg.hidden_size} L={cfg.num_hidden_layers} V={cfg.vocab_size}\n")
    print(header + text)
    args.out.mkdir(parents=True, exist_ok=True)
    from mambapeft.io import atomic_path
    with atomic_path(args.out / "falcon_bench.jsonl") as p:
        Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with atomic_path(args.out / "falcon_bench.txt") as p:
        Path(p).write_text(header + text + "\n")


if __name__ == "__main__":
    main()

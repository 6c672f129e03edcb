"""GPU benchmark: our PEFT methods on the mamba_ssm kernels against transformers + peft.

mamba-130m shape (D=768, 24 layers, vocab 50280), random init, fp32 weights, bf16 autocast, AdamW,
batch 8 x 1024 tokens; median step time after warm-up, tokens/s and peak memory
(torch.cuda.max_memory_allocated, weights and optimizer state included). Then greedy generation
(256 new tokens after an 8-token prompt, bf16 weights, batch 1 and 32) with a merged LoRA against
transformers' generate (use_cache=True), and the pure-torch paths (no kernels) on a smaller batch.

    PYTHONPATH=src python bench/bench_gpu.py --out bench/results
Writes gpu_bench.jsonl (one line per run) and gpu_bench.txt (the table) under --out.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

BLOCK = ("mamba_ssm", "causal_conv1d", "selective_scan_cuda", "causal_conv1d_cuda")
if "--no-kernels" in sys.argv:  # make the kernel packages unimportable, before anything imports them
    for name in BLOCK:
        sys.modules[name] = None

import torch  # noqa: E402

V, D, L = 50280, 768, 24
LM_METHODS = ["lora_in_proj", "lora_out_proj", "lora_x_proj", "lora_dt", "lora_embed", "lora_X", "lora_Z", "lora_d",
              "lora_B", "lora_C", "A", "D", "conv1d", "bias", "prompt", "affix", "additional_scan",
              "parallel_adapter"]
OURS = {
    "full": None,
    "lora_in_proj_r8": {"lora_in_proj": {"r": 8}},
    "lora_X_r64": {"lora_X": {"r": 64}},
    "affix_3": {"affix": {"tokens": 3}},
    "additional_scan_6": {"additional_scan": {"states": 6}},
    "all_methods": {m: {} for m in LM_METHODS},
}


class KernelCounter:
    """Counts calls of mamba_ssm's scan kernel (proves which path a model takes)."""

    def __init__(self):
        self.calls = 0
        try:
            import selective_scan_cuda
        except ImportError:
            self.mod = None
            return
        self.mod, self.orig = selective_scan_cuda, selective_scan_cuda.fwd

        def fwd(*a, **k):
            self.calls += 1
            return self.orig(*a, **k)
        self.wrapped = fwd

    def __enter__(self):
        if self.mod is not None:
            self.mod.fwd = self.wrapped
        return self

    def __exit__(self, *exc):
        if self.mod is not None:
            self.mod.fwd = self.orig


def ours_model(methods, dtype=torch.float32):
    from mambapeft.models import MambaConfig, MambaForCausalLM
    from mambapeft.peft import PeftConfig, get_peft_model
    with torch.device("cuda"):
        model = MambaForCausalLM(MambaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L)).to(dtype)
    if methods is None:
        return model
    return get_peft_model(model, PeftConfig(methods)).cuda()   # adapters are created on the CPU


def hf_model(lora=True, dtype=torch.float32):
    import transformers
    cfg = transformers.MambaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, state_size=16, expand=2,
                                   conv_kernel=4)
    with torch.device("cuda"):
        model = transformers.MambaForCausalLM(cfg).to(dtype)
    if lora:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["in_proj"], r=8))
    return model


def train(name, build, batch, seqlen, steps, warmup, hf=False, backend=None):
    from mambapeft.ops.scan import scan_backend
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = build()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, V, (batch, seqlen), device="cuda")
    times, losses = [], []
    counter = KernelCounter()
    with scan_backend(backend or "auto"):
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16), (counter if i == 0 else _null()):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            losses.append(out.loss.item())
            del out
    med = sorted(times)[len(times) // 2]
    row = dict(run=name, kind="train", impl="transformers+peft" if hf else "mambapeft", backend=backend or "auto",
               batch=batch, seqlen=seqlen, steps=steps, median_step_s=med, tokens_per_s=batch * seqlen / med,
               peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
               trainable=sum(p.numel() for p in params), scan_kernel_calls_per_forward=counter.calls,
               first_loss=losses[0], last_loss=losses[-1], step_times=times)
    del model, opt, params
    return row


def train_interleaved(runs, batch, seqlen, steps, warmup):
    """All models at once, one step of each in turn: the machine's drifts (other tenants, clocks)
    then hit every run alike, which separate runs minutes apart do not. Returns tokens/s per run."""
    from mambapeft.ops.scan import scan_backend
    torch.manual_seed(0)
    ids = torch.randint(0, V, (batch, seqlen), device="cuda")
    live = []
    for name, build, _ in runs:
        model = build().train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        live.append((name, model, opt, []))
    with scan_backend("auto"):
        for i in range(warmup + steps):
            for name, model, opt, times in live:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast("cuda", torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    out = {name: batch * seqlen / sorted(times)[len(times) // 2] for name, _, _, times in live}
    del live
    gc.collect()
    torch.cuda.empty_cache()
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@torch.no_grad()
def generate(name, batch, new_tokens, hf=False):
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    if hf:
        import peft
        model = hf_model(lora=True)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
        model = model.merge_and_unload().to(torch.bfloat16).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        del peft
        run = lambda ids, n: model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=True)  # noqa: E731
    else:
        p = ours_model({"lora_in_proj": {"r": 8}})
        for t in p.method_of:
            t.add_(torch.randn_like(t) * 0.01)
        model = p.merge_and_unload().to(torch.bfloat16).eval()
        run = lambda ids, n: model.generate(ids, max_new_tokens=n, eos_token_id=-1)  # noqa: E731
    ids = torch.randint(1, V, (batch, 8), device="cuda")
    counter = KernelCounter()
    with counter:
        run(ids, 4)                        # warm-up (compiles the triton state update)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = run(ids, new_tokens)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert out.shape == (batch, 8 + new_tokens), out.shape
    row = dict(run=name, kind="generate", impl="transformers" if hf else "mambapeft", batch=batch,
               new_tokens=new_tokens, seconds=dt, tokens_per_s=batch * new_tokens / dt,
               scan_kernel_calls_in_warmup=counter.calls)
    return row


def profile(build, batch, seqlen, path, backend=None):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from mambapeft.ops.scan import scan_backend
    model = build()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, V, (batch, seqlen), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with scan_backend(backend or "auto"):
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            step()
            torch.cuda.synchronize()
    with open(path, "a") as f:
        f.write(f"==== {path} batch {batch}x{seqlen}\n")
        f.write(p.key_averages().table(sort_by="cuda_time_total", row_limit=30))


def torch_backend():
    import importlib.util
    return "chunked" if importlib.util.find_spec("mambapeft.ops.scan_chunked") else "cpu"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--only", default="train,hf,generate,torch")
    ap.add_argument("--interleave", default="",
                    help="comma list of training runs to also time step by step in turn (e.g. "
                         "hf_lora_in_proj_r8,lora_X_r64,affix_3,additional_scan_6)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the 8x1024 training runs this many times, interleaved, and pool their steps")
    ap.add_argument("--profile", default="", help="comma list of runs to profile (e.g. lora_X_r64,hf_lora)")
    ap.add_argument("--torch-shape", default="1x256", help="batch x seqlen of the pure-torch runs (no kernels)")
    ap.add_argument("--torch-steps", type=int, default=2, help="timed steps of the pure-torch runs (after 1 warm-up)")
    ap.add_argument("--no-kernels", action="store_true", help="(internal) transformers without the kernels")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows, only = [], set(args.only.split(","))
    tb, tl = map(int, args.torch_shape.split("x"))
    small = dict(batch=tb, seqlen=tl, steps=args.torch_steps, warmup=1)

    if args.no_kernels:  # child process: transformers' pure-torch path
        rows.append(train(f"hf_lora_in_proj_r8_torch_{args.torch_shape}", hf_model, hf=True, **small))
        print(json.dumps(rows[-1]))
        return

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    runs = []
    if "hf" in only:
        runs += [("hf_lora_in_proj_r8", hf_model, True), ("hf_full", lambda: hf_model(lora=False), True)]
    if "train" in only:
        runs += [(name, lambda m=methods: ours_model(m), False) for name, methods in OURS.items()]
    pooled = {}
    for _ in range(args.rounds):  # interleaved rounds: drifts of the machine hit every run alike
        for name, build, hf in runs:
            row = train(name, build, args.batch, args.seqlen, args.steps, args.warmup, hf=hf)
            print(json.dumps(row), flush=True)
            pooled.setdefault(name, []).append(row)
    for name, parts in pooled.items():
        times = sorted(t for r in parts for t in r["step_times"])
        med = times[len(times) // 2]
        rows.append({**parts[0], "rounds": len(parts), "steps": len(times), "median_step_s": med,
                     "tokens_per_s": args.batch * args.seqlen / med,
                     "round_tokens_per_s": [round(r["tokens_per_s"]) for r in parts],
                     "peak_mem_gib": max(r["peak_mem_gib"] for r in parts)})
    chosen = [r for r in runs if r[0] in args.interleave.split(",")]
    if chosen:
        tps = train_interleaved(chosen, args.batch, args.seqlen, 3 * args.steps, args.warmup)
        for row in rows:
            if row["run"] in tps:
                row["interleaved_tokens_per_s"] = tps[row["run"]]
        print(json.dumps({"interleaved_tokens_per_s": tps}), flush=True)
    if "generate" in only:
        for b in (1, 32):
            emit(generate(f"gen_hf_b{b}", b, args.new_tokens, hf=True))
            emit(generate(f"gen_ours_b{b}", b, args.new_tokens))
    if "torch" in only:
        be = torch_backend()
        shape = args.torch_shape
        emit(train(f"lora_X_r64_torch_{be}_{shape}", lambda: ours_model(OURS["lora_X_r64"]), backend=be, **small))
        emit(train(f"lora_in_proj_r8_torch_{be}_{shape}", lambda: ours_model(OURS["lora_in_proj_r8"]), backend=be,
                   **small))
        child = subprocess.run([sys.executable, __file__, "--no-kernels", "--out", args.out, "--torch-shape",
                                args.torch_shape, "--torch-steps", str(args.torch_steps)],
                               capture_output=True, text=True, timeout=540)
        line = [x for x in child.stdout.splitlines() if x.startswith("{")]
        if line:
            emit(json.loads(line[-1]))
        else:
            print("no-kernel transformers run failed:\n", child.stdout[-3000:], child.stderr[-3000:])
    for name in filter(None, args.profile.split(",")):
        build = hf_model if name == "hf_lora" else (lambda m=OURS[name]: ours_model(m))
        profile(build, args.batch, args.seqlen, os.path.join(args.out, "gpu_profile.txt"))

    table = report(rows)
    print(table)
    with open(os.path.join(args.out, "gpu_bench.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(args.out, "gpu_bench.txt"), "w") as f:
        f.write(table + "\n")


def report(rows):
    by = {r["run"]: r for r in rows}
    base = by.get("hf_lora_in_proj_r8")
    lines = [f"{'run':34s} {'impl':18s} {'batch':>9s} {'tok/s':>10s} {'x hf+peft':>9s} {'peak GiB':>9s} "
             f"{'x hf+peft':>9s} {'kernel calls':>12s}"]
    for r in rows:
        if r["kind"] != "train":
            continue
        rt = rm = ""
        same_path = ("_torch" in r["run"]) == ("_torch" in base["run"]) if base else False
        if base and same_path and r["batch"] == base["batch"] and r["seqlen"] == base["seqlen"]:
            rt = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}"
            rm = f"{r['peak_mem_gib'] / base['peak_mem_gib']:.2f}"
        lines.append(f"{r['run']:34s} {r['impl']:18s} {str(r['batch']) + 'x' + str(r['seqlen']):>9s} "
                     f"{r['tokens_per_s']:10.0f} {rt:>9s} {r['peak_mem_gib']:9.2f} {rm:>9s} "
                     f"{r['scan_kernel_calls_per_forward']:12d}")
    lx = by.get("lora_X_r64")
    if lx:
        for n in ("affix_3", "additional_scan_6"):
            if n in by:
                lines.append(f"{n} tokens/s vs lora_X_r64: {by[n]['tokens_per_s'] / lx['tokens_per_s']:.2f}")
    inter = {r["run"]: r["interleaved_tokens_per_s"] for r in rows if "interleaved_tokens_per_s" in r}
    if inter:
        lines.append("step by step in turn (all models on the GPU at once; median step):")
        ref = inter.get("hf_lora_in_proj_r8")
        for n, tps in inter.items():
            ratio = f"  x hf+peft {tps / ref:.2f}" if ref else ""
            vs_x = f"  x lora_X_r64 {tps / inter['lora_X_r64']:.2f}" if "lora_X_r64" in inter else ""
            lines.append(f"  {n:32s} {tps:10.0f} tok/s{ratio}{vs_x}")
    for b in (1, 32):
        h, o = by.get(f"gen_hf_b{b}"), by.get(f"gen_ours_b{b}")
        if h and o:
            lines.append(f"generate batch {b:2d}: ours {o['tokens_per_s']:8.0f} tok/s, transformers "
                         f"{h['tokens_per_s']:8.0f} tok/s, ratio {o['tokens_per_s'] / h['tokens_per_s']:.2f}")
    for r in (r for r in rows if r["kind"] == "train"):  # pure torch: ours against transformers, same shape
        shape = f"{r['batch']}x{r['seqlen']}"
        hf = by.get(f"hf_lora_in_proj_r8_torch_{shape}")
        if r["run"].startswith("lora_in_proj_r8_torch") and hf:
            lines.append(f"pure torch, LoRA(in_proj) r8, {shape}: ours ({r['backend']}) {r['tokens_per_s']:.0f} "
                         f"tok/s vs transformers {hf['tokens_per_s']:.0f} tok/s, ratio "
                         f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

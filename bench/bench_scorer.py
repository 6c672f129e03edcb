"""Zero-shot multiple choice: our scorer (`mambapeft eval`) against lm-evaluation-harness's HF model
(`--model hf`, transformers.MambaForCausalLM) on the same weights and the same lm-eval task, same run.
Documents per second; the accuracy and the log-likelihoods must agree.

    PYTHONPATH=src python bench/bench_scorer.py                      # random Mamba D=256, 4 layers, CPU
    PYTHONPATH=src python bench/bench_scorer.py --model DIR --device cuda --docs 500   # a real model, GPU

The task is synthetic (sums in digits, `--context` characters of worked sums before the question,
`--choices` answers), written as an lm-eval YAML task with local JSON lines data. Without --model the
model is a random Mamba saved in the Hugging Face format with the shipped character tokenizer.
"""
import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mambapeft.language import multiple_choice as mc
from mambapeft.models import MambaConfig, MambaForCausalLM
from mambapeft.models.checkpoint import load_tokenizer

TINY = Path(__file__).resolve().parent.parent / "src" / "mambapeft" / "assets" / "tiny-mamba"


def write_task(folder, docs, choices, context, seed=0):
    rnd = random.Random(seed)
    rows = []
    for _ in range(docs):
        text = ""
        while len(text) < context:
            a, b = rnd.randrange(100), rnd.randrange(100)
            text += f"{a}+{b}={a + b}\n"
        a, b = rnd.randrange(1000), rnd.randrange(1000)
        answers = [str(a + b)] + [str(a + b + d) for d in rnd.sample(range(-50, 50), choices) if d][:choices - 1]
        order = list(range(choices))
        rnd.shuffle(order)
        rows.append({"q": f"{text}{a}+{b}=", "choices": [answers[i] for i in order], "label": order.index(0)})
    (folder / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "sums.yaml").write_text(
        f"task: sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/sums.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder / "sums.yaml"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Mamba directory in the HF format (default: a random one, see --hidden)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--context", type=int, default=120, help="characters of worked sums before each question")
    ap.add_argument("--batch-size", type=int, default=32, help="for both scorers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each, in turn; the median counts")
    ap.add_argument("--jsonl", help="append the result as one JSON line here")
    args = ap.parse_args()
    from lm_eval.models.huggingface import HFLM

    from mambapeft.language.harness import DTYPES, load
    tmp = Path(tempfile.mkdtemp(prefix="bench-scorer-"))
    if args.model is None:
        torch.manual_seed(0)
        cfg = MambaConfig(vocab_size=16, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          state_size=16, time_step_rank=max(1, args.hidden // 16), eos_token_id=0, pad_token_id=0,
                          bos_token_id=0)
        MambaForCausalLM(cfg).save_pretrained(tmp / "model")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (tmp / "model" / f).write_bytes((TINY / f).read_bytes())
        args.model = str(tmp / "model")
    yaml = write_task(tmp, args.docs, args.choices, args.context)
    task = mc.load_task(str(yaml))
    tok = load_tokenizer(args.model)
    dtype = DTYPES[args.dtype]

    model, _ = load(args.model, None, dtype, args.device)
    hf = HFLM(pretrained=args.model, backend="causal", device=args.device, batch_size=args.batch_size,
              dtype=args.dtype)
    docs = mc.documents(task)

    def run_ours():
        return mc.evaluate(model, tok, [task], args.batch_size)["sums"]

    def run_theirs():   # only the harness's model calls: its request building is not timed
        return hf.loglikelihood(task.instances, disable_tqdm=True)

    run_ours()   # warm-up (and the task's instances for the harness)
    task.build_all_requests(rank=0, world_size=1)
    run_theirs()
    ours_t, theirs_t = [], []
    for _ in range(args.repeats):   # in turn, so that load on a shared machine hits both alike
        t = time.perf_counter()
        ours = run_ours()
        ours_t.append(time.perf_counter() - t)
        task.build_all_requests(rank=0, world_size=1)
        t = time.perf_counter()
        theirs_ll = run_theirs()
        theirs_t.append(time.perf_counter() - t)
    ours_s, theirs_s = statistics.median(ours_t), statistics.median(theirs_t)
    ours_ll = mc.score(model, [mc.encode_pair(tok, c, k, tok.eos_token_id) for _, a in docs for c, k in a],
                       args.batch_size, tok.pad_token_id or 0)
    k = args.choices
    per_doc = [task.process_results(task.instances[i * k].doc, theirs_ll[i * k:(i + 1) * k]) for i in range(len(docs))]
    theirs = {m: sum(d[m] for d in per_doc) / len(per_doc) for m in ("acc", "acc_norm")}
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours_ll, theirs_ll))

    res = {"model": "random" if str(tmp) in args.model else args.model, "hidden": args.hidden, "layers": args.layers,
           "docs": args.docs, "choices": k, "context_chars": args.context, "batch_size": args.batch_size,
           "repeats": args.repeats, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
           "ours_docs_per_s": args.docs / ours_s, "lm_eval_hf_docs_per_s": args.docs / theirs_s,
           "speedup": theirs_s / ours_s, "ours": {m: ours[m] for m in ("acc", "acc_norm")}, "lm_eval_hf": theirs,
           "max_abs_loglik_diff": diff, "torch": torch.__version__, "python": platform.python_version()}
    print(f"multiple choice, {args.docs} docs x {k} choices, ~{args.context + 8} chars of context, "
          f"batch {args.batch_size}, {args.device} {args.dtype}, {torch.get_num_threads()} threads")
    print(f"  mambapeft eval            {res['ours_docs_per_s']:9.1f} docs/s   acc {ours['acc']:.4f} "
          f"acc_norm {ours['acc_norm']:.4f}")
    print(f"  lm-eval hf (transformers) {res['lm_eval_hf_docs_per_s']:9.1f} docs/s   acc {theirs['acc']:.4f} "
          f"acc_norm {theirs['acc_norm']:.4f}")
    print(f"  speedup {res['speedup']:.1f}x (target >= 3x); max |log-likelihood diff| {diff:.2e}")
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(res) + "\n")
    ok = ours["acc"] == theirs["acc"] and ours["acc_norm"] == theirs["acc_norm"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

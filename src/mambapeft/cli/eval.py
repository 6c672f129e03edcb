"""`mambapeft eval`: zero-shot multiple-choice accuracy of a Mamba (and an adapter) on lm-eval tasks."""
from . import DEFAULT_MODEL, UsageError


def add_parser(sub):
    e = sub.add_parser("eval", help="zero-shot multiple-choice accuracy on lm-evaluation-harness tasks")
    e.add_argument("--model", default=DEFAULT_MODEL, help="model directory or hub id, or a shipped model's name "
                   "(mamba-default, tiny-mamba; default: the shipped tiny model)")
    e.add_argument("--adapter", help="adapter directory (written by mambapeft train or PeftModel.save_pretrained)")
    e.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's)")
    e.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval task names or YAML task files; 'paper' = the paper's eight tasks; "
                   "'default' = the shipped language suite's four tasks")
    e.add_argument("--data-dir", help="folder with NAME/SPLIT.jsonl for named tasks whose data is not in the hub cache")
    e.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (scores do not depend on it)")
    e.add_argument("--limit", type=int, help="only the first N documents of each task")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    e.add_argument("--output", help="folder for results.json and results.md")


def table(results):
    """A Markdown table: one row per task, acc and acc_norm in percent, the mean of each last."""
    rows = ["| task | n | acc | acc_norm |", "|---|---:|---:|---:|"]
    fmt = lambda v: "" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for name, r in results.items():
        rows.append(f"| {name} | {r['n']} | {fmt(r.get('acc'))} | {fmt(r.get('acc_norm'))} |")
    if len(results) > 1:
        mean = {k: sum(r[k] for r in results.values()) / len(results)
                for k in ("acc", "acc_norm") if all(k in r for r in results.values())}
        rows.append(f"| mean | {sum(r['n'] for r in results.values())} | {fmt(mean.get('acc'))} | "
                    f"{fmt(mean.get('acc_norm'))} |")
    return "\n".join(rows) + "\n"


def run(args):
    import torch
    from ..io import atomic_path, write_json
    from ..language import multiple_choice as mc
    from ..language.data import DataError
    from ..language.harness import DTYPES, load
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UsageError("--batch-size and --limit: expected integers >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tasks, missing = [], []
    from ..default import shipped
    args.model = shipped.resolve_model(args.model)
    specs = [t for s in mc.task_specs(args.tasks)
             for t in (shipped.language_tasks().values() if s == "default" else [s])]
    for spec in specs:   # every data problem at once, and before the model loads
        try:
            tasks.append(mc.load_task(spec, args.data_dir))
        except DataError as e:
            missing.append(str(e))
    if missing:
        raise UsageError("; ".join(missing))
    model, tokenizer = load(args.model, args.adapter, DTYPES[args.dtype], device, args.tokenizer)
    results = mc.evaluate(model, tokenizer, tasks, args.batch_size, args.limit)
    md = table(results)
    print(md, end="")
    if args.output:
        from pathlib import Path
        out = Path(args.output)
        write_json(out / "results.json", {"model": args.model, "adapter": args.adapter, "dtype": args.dtype,
                                          "limit": args.limit, "results": results})
        with atomic_path(out / "results.md") as tmp:
            tmp.write_text(md)

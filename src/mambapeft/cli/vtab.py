"""`mambapeft vtab`: one method configuration over VTAB-1k tasks, a result per task and the summary."""
import sys


def add_parser(sub):
    from ..vision.vtab import VTAB_TASKS
    p = sub.add_parser(
        "vtab", help="train and test one method configuration on VTAB-1k tasks (Vim), with the group means",
        description="Train and test one method configuration on VTAB-1k tasks. The protocol's settings "
        "(vision/vtab.yaml: AdamW lr 1e-3, weight decay 1e-4, 10 warmup epochs then cosine to 1e-5, 100 "
        "epochs, batch 32, clipping 5) apply wherever CONFIG is silent. Each task writes "
        "OUTPUT/<task>/result.json; a rerun skips tasks that have one and continues a task stopped part "
        "way from its last checkpoint. With several GPUs one worker "
        "process per GPU takes tasks from a queue. Ends with OUTPUT/summary.{md,json,png}.")
    p.add_argument("config", help="YAML file: model, methods, task.root (the folder holding the task folders) "
                   "or task.suite: default (the shipped suite), training, output_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override a config value, e.g. training.epochs=10 methods=affix")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help=f"the tasks to run (default: all 19): {', '.join(VTAB_TASKS)}")
    p.add_argument("--output", help="output directory (default: the config's output_dir)")
    p.add_argument("--workers", type=int,
                   help="worker processes running tasks at once (default: one per visible GPU, or 1)")


def run(args):
    from . import UsageError
    from ..vision.vtab import load_config, read_results, run_vtab, summarize, task_table
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    # `--tasks a b key=value`: argparse gives the trailing overrides to --tasks
    overrides = args.overrides + [t for t in args.tasks or () if "=" in t]
    tasks = [t for t in args.tasks or () if "=" not in t] or None
    config = load_config(args.config, overrides)
    out = args.output or config.get("output_dir")
    if not out:
        raise UsageError(f"{args.config}: no output_dir; give one in the config or with --output")
    errors = run_vtab(config, tasks, out, args.workers)
    table = task_table(config)
    s = summarize(out, table)
    for name, r in read_results(out, table).items():   # what each task learned, and where it is
        before = f"{r['base_top1']:5.1f} -> " if "base_top1" in r else ""
        print(f"{name:<14} top-1 {before}{r['top1']:5.1f}  trainable {r['trainable_params']:,d}  "
              f"adapter {out}/{name}/run/last  curves {out}/{name}/run/curves.png")
    print(f"summary: {out}/summary.md; mean top-1 {s['mean']:.2f} over {s['count']} task(s)"
          if s["count"] else f"summary: {out}/summary.md; no task finished")
    for name, error in errors.items():
        print(f"mambapeft: error: {name}: {error}", file=sys.stderr)
    return 1 if errors else 0

"""The method table (issue 12, part 5): every PEFT method of the registry at its default settings,
DoRA, full fine-tuning, linear probing (vision), every method at once and the hybrid search's best,
trained and tested on both default suites; accuracy per task and mean, trainable parameters,
training time and peak memory.

    PYTHONPATH=src python bench/method_table.py --lm LM_DIR --vim VIM_DIR \
        --language-suite OUT/language --vision-suite OUT/vision --time-limit 450

Runs go through the project's own paths: a language row is `mambapeft train` with the `language`
task (train.json, the suite's lm-eval YAML files as eval_tasks); a vision row is, per task,
`mambapeft train src/mambapeft/vision/vtab.yaml task.root=SUITE task.data=TASK ...` (the VTAB-1k
protocol file with image_size 32); the hybrid row trains the best configuration that
`mambapeft search` finds with a small budget. Many runs share one GPU as separate worker
processes. Each finished row is written at once (bench/results/method_table.jsonl, docs/method_table.md,
bench/results/method_table.png, all atomically): a killed run keeps its rows and a rerun skips them.
`--smoke` checks the whole path on CPU in a few minutes (give it small stand-in models)."""
import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import method_table_report as report  # noqa: E402

# Per-suite protocol (the paper's, scaled to 1,000-sample tasks and tiny models; --epochs overrides).
LANGUAGE = {"epochs": 3, "batch_size": 32, "lr": 1e-3, "full_lr": 1e-4, "validation_size": 200, "cutoff": 256,
            "search_epochs": 1}
VISION = {"epochs": 5, "batch_size": 32, "lr": 1e-3, "full_lr": 1e-4, "image_size": 32, "search_epochs": 2}
FIRST = ["lora_X", "full", "head", "all"]   # run first: what the findings need most


# ---- rows -----------------------------------------------------------------------------------
def rows_for(suite, dora="lora_X"):
    """[(row, group, methods)] for a suite: each registered method that applies to the model at its
    defaults, DoRA rows, the baselines and `all`. The hybrid row is added once the search is done."""
    from dataclasses import fields

    from mambapeft.peft.registry import METHODS
    kind = "lm" if suite == "language" else "vim"
    names = [n for n, s in METHODS.items() if kind in s.models and n not in ("full", "head")]
    with_dora = [n for n in names if "dora" in {f.name for f in fields(METHODS[n].settings)}]
    dora = with_dora if dora == "all" else [d for d in (dora.split(",") if dora else []) if d]
    bad = [d for d in dora if d not in with_dora]
    if bad:
        raise SystemExit(f"method_table: --dora: {', '.join(bad)} has no DoRA option; expected some of "
                         f"{', '.join(with_dora)} or 'all'")
    rows = [(n, METHODS[n].family, {n: {}}) for n in names]
    rows += [(f"{n}+dora", "DoRA", {n: {"dora": True}}) for n in dora]
    rows.append(("full", "Baseline", {"full": {}}))
    if kind == "vim":
        rows.append(("head", "Baseline", {"head": {}}))   # linear probing
    # every method that combines: all but full (full trains every weight, so an adapter beside it is moot)
    rows.append(("all", "Combination", {n: {} for n in names}))
    first = {r: i for i, r in enumerate(FIRST)}
    return sorted(rows, key=lambda r: first.get(r[0], len(FIRST)))


def task_groups():
    """{task: group} of the default vision suite (natural, specialized, structured), if the package says."""
    try:
        from mambapeft.default.vision_suite import GROUPS
        return dict(GROUPS)
    except ImportError:
        return {}


def vision_tasks(suite_dir, only=None):
    """The suite's task folders, in the paper's group order (natural, specialized, structured)."""
    tasks = sorted(p.name for p in Path(suite_dir).iterdir() if (p / "train800val200.txt").is_file())
    if not tasks:
        raise SystemExit(f"method_table: {suite_dir}: no VTAB-1k task folders (with train800val200.txt) in it")
    if only:
        bad = [t for t in only if t not in tasks]
        if bad:
            raise SystemExit(f"method_table: no task {', '.join(bad)} in {suite_dir}; expected some of "
                             f"{', '.join(tasks)}")
        tasks = [t for t in tasks if t in only]
    order = {"natural": 0, "specialized": 1, "structured": 2}
    groups = task_groups()
    return sorted(tasks, key=lambda t: (order.get(groups.get(t), 3), t))


# ---- configs of one run -----------------------------------------------------------------------
def language_config(args, p, methods, run_dir, lr):
    suite = Path(args.language_suite).resolve()
    yamls = sorted(str(y) for y in suite.glob("*.yaml"))
    task = {"type": "language", "data": str(suite / "train.json"), "eval_tasks": yamls, "cutoff": p["cutoff"],
            "validation_size": p["validation_size"], "metric": "loss", "eval_batch_size": 64}
    if args.smoke:
        task.update(validation_size=16, eval_limit=16)
    training = {"lr": lr, "batch_size": p["batch_size"], "epochs": p["epochs"], "warmup_ratio": 0.1,
                "schedule": "linear", "weight_decay": 0.0, "progress": False, "keep_checkpoints": 1,
                "device": args.device, "max_steps": p.get("max_steps")}
    return {"model": {"path": str(Path(args.lm).resolve())}, "methods": methods, "task": task,
            "training": training, "output_dir": str(run_dir)}


def vision_overrides(args, p, methods, task, run_dir, lr):
    """`mambapeft train src/mambapeft/vision/vtab.yaml` + these: the VTAB-1k protocol at 32x32."""
    o = [f"model.path={Path(args.vim).resolve()}", f"methods={json.dumps({'head': {}, **methods})}",
         f"task.root={Path(args.vision_suite).resolve()}", f"task.data={task}", f"task.image_size={p['image_size']}",
         "task.num_workers=0", "task.eval_batch_size=250", f"training.epochs={p['epochs']}",
         f"training.batch_size={p['batch_size']}", f"training.lr={lr}", "training.num_workers=0",
         "training.progress=false", "training.keep_checkpoints=1", f"training.device={args.device}",
         f"output_dir={run_dir}"]
    if p.get("max_steps"):
        o.append(f"training.max_steps={p['max_steps']}")
    return o


# ---- one job, in a worker process -------------------------------------------------------------
def _init_worker(threads):
    import torch
    torch.set_num_threads(threads)


def _trainable(run_dir):
    from mambapeft.io import read_weights
    return sum(v.numel() for v in read_weights(Path(run_dir) / "last" / "adapter_model.safetensors").values())


def _train_seconds(run_dir):
    from mambapeft.training import logs
    return sum(r.get("step_s", 0.0) for r in logs.read(Path(run_dir) / logs.LOG) if "split" not in r)


def run_job(job):
    """Train and test one run; returns (and writes to job["done"]) its measurements."""
    import torch

    from mambapeft.io import write_json
    from mambapeft.training.trainer import train
    cuda = torch.cuda.is_available() and job["device"] != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run_dir = Path(job["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)   # a run killed part way starts again
    started = time.time()
    if job["suite"] == "language":
        metrics = train(job["config"])
        test = metrics["test"]
        from mambapeft.language import multiple_choice as mc
        names = [t.config.task for t in (mc.load_task(y) for y in job["config"]["task"]["eval_tasks"])]
        limit = job["config"]["task"].get("eval_limit")
        tasks = {n: 100 * test[f"{n}/acc"] for n in names}
        samples = {n: len(list(mc.load_task(y).test_docs())) for n, y in
                   zip(names, job["config"]["task"]["eval_tasks"])}
        samples = {n: min(v, limit) if limit else v for n, v in samples.items()}
    else:
        from mambapeft.vision.vtab import PROTOCOL
        metrics = train(str(PROTOCOL), overrides=job["overrides"])
        tasks = {job["task"]: 100 * metrics["test"]["acc"]}
        samples = {job["task"]: int(metrics["test"]["samples"])}
    out = {"tasks": tasks, "test_samples": samples, "trainable_params": _trainable(run_dir),
           "train_s": _train_seconds(run_dir), "wall_s": time.time() - started, "steps": metrics["steps"],
           "peak_mem_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "protocol": job["protocol"]}
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    write_json(job["done"], out)
    return out


# ---- the search ---------------------------------------------------------------------------------
def search_config(args, suite, p, work):
    out = work / f"search-{suite}"
    training = {"lr": p["lr"], "batch_size": p["batch_size"], "epochs": p["search_epochs"], "progress": False,
                "device": args.device, "keep_checkpoints": 1, "max_steps": p.get("search_max_steps")}
    if suite == "language":
        c = language_config(args, p, {}, "-", p["lr"])
        task = {k: v for k, v in c["task"].items() if k not in ("eval_tasks", "eval_limit")}  # validation loss only
        cfg = {"model": c["model"], "task": task, "training": {**c["training"], **training}}
    else:
        from mambapeft.training.config import read_yaml
        from mambapeft.vision.vtab import PROTOCOL
        proto = read_yaml(PROTOCOL)["training"]
        root = str(Path(args.vision_suite).resolve())
        tasks = [{"type": "vision", "root": root, "data": t, "train": "train800", "image_size": p["image_size"],
                  "num_workers": 0, "eval_batch_size": 200} for t in search_tasks(args)]
        cfg = {"model": {"path": str(Path(args.vim).resolve())}, "tasks": tasks,
               "training": {**proto, **training, "num_workers": 0}}
    cfg["training"] = {k: v for k, v in cfg["training"].items() if v is not None}
    cfg["output_dir"] = str(out)
    cfg["search"] = {"trials": args.search_trials, "pruner": {"type": "median", "startup_trials": 3},
                     "threads": 1, "seed": 0, "heartbeat_interval": 10}
    out.mkdir(parents=True, exist_ok=True)
    path = work / f"search-{suite}.yaml"
    import yaml
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def search_tasks(args):
    """The vision search's objective tasks: --search-tasks, else the first task of each group."""
    tasks = vision_tasks(args.vision_suite, args.vision_tasks)
    if args.search_tasks:
        return vision_tasks(args.vision_suite, args.search_tasks.split(","))
    groups, first = task_groups(), {}
    for t in tasks:
        first.setdefault(groups.get(t, t), t)
    return list(first.values())


def start_search(path, workers, log_dir):
    """`mambapeft search CONFIG --no-test` in `workers` processes on one study (they share its SQLite)."""
    cmd = [sys.executable, "-m", "mambapeft.cli", "search", str(path), "--no-test"]
    procs = []
    for i in range(workers):
        log = open(Path(log_dir) / f"{Path(path).stem}.worker{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()), log))
        time.sleep(0.5)   # the first creates the study's tables
    return procs, shlex.join(["mambapeft", *cmd[3:]])


def search_best(path):
    """The methods of the search's best.yaml and its comment line (study, trial, validation score)."""
    import yaml
    best = Path(yaml.safe_load(Path(path).read_text())["output_dir"]) / "best.yaml"
    text = best.read_text()
    return yaml.safe_load(text)["methods"], text.splitlines()[0].lstrip("# ").strip()


# ---- the run --------------------------------------------------------------------------------------
def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class Table:
    """The rows of this run and how far they are; records go to the outputs as each row finishes."""

    def __init__(self, args, protocols, work):
        self.args, self.protocols, self.work = args, protocols, work
        self.command = "PYTHONPATH=src python " + shlex.join(["bench/method_table.py", *sys.argv[1:]])
        self.commit = getattr(args, "commit", None) or git_commit()
        self.records = report.read_records(args.out / "method_table.jsonl")
        self.parts = {}      # (suite, row) -> {"group", "methods", "jobs": n, "done": [run results], ...}
        self.last_write = 0.0

    def done_already(self, suite, row, methods):
        return any(r["suite"] == suite and r["row"] == row and r.get("protocol") == self.protocol(suite, methods, row)
                   for r in self.records)

    def hybrid_done(self, suite):
        """A hybrid row of this protocol and search budget exists: no need to search again."""
        p = self.protocol(suite, None, "hybrid")
        return any(r["suite"] == suite and r["row"] == "hybrid" and
                   {**r.get("protocol", {}), "methods": None} == p for r in self.records)

    def protocol(self, suite, methods, row=None):
        """What decides a row's result; a record made with another one is run again."""
        p = {k: v for k, v in self.protocols[suite].items() if row == "hybrid" or not k.startswith("search")}
        if row == "hybrid":
            p["search_trials"] = self.args.search_trials
        return {**p, "methods": methods}

    def finish_job(self, suite, row, result):
        part = self.parts[(suite, row)]
        part["done"].append(result)
        if len(part["done"]) < part["jobs"]:
            return None
        rs = part["done"]
        tasks = {t: a for r in rs for t, a in r["tasks"].items()}
        order = part.get("order") or sorted(tasks)
        tasks = {t: tasks[t] for t in order if t in tasks}
        mems = [r["peak_mem_mb"] for r in rs if r["peak_mem_mb"] is not None]
        record = {"suite": suite, "row": row, "group": part["group"], "methods": part["methods"],
                  "tasks": tasks, "mean": report.mean(tasks.values()),
                  "test_samples": {t: n for r in rs for t, n in r["test_samples"].items()},
                  # vision: the head's size depends on each task's classes: the mean over the tasks
                  "trainable_params": round(report.mean(r["trainable_params"] for r in rs)),
                  "train_s": sum(r["train_s"] for r in rs), "wall_s": sum(r["wall_s"] for r in rs),
                  "steps": sum(r["steps"] for r in rs), "peak_mem_mb": max(mems) if mems else None,
                  "device": rs[0]["device"], "protocol": self.protocol(suite, part["methods"], row),
                  "run_command": part["run_command"], "command": self.command, "commit": self.commit,
                  "concurrent_runs": self.args.workers + self.args.search_workers * 2,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if part.get("order"):
            groups = task_groups()
            record["task_groups"] = {t: groups[t] for t in tasks if t in groups}
        if part.get("search_note"):
            record["search_note"] = part["search_note"]
        if self.protocols[suite].get("note"):
            record["protocol_note"] = self.protocols[suite]["note"]
        self.records = [r for r in self.records if (r["suite"], r["row"]) != (suite, row)] + [record]
        self.write(force=False)
        return record

    def write(self, force=True):
        """The .jsonl every time; the Markdown and the plot at most every 15 s unless forced."""
        a = self.args
        if force or time.time() - self.last_write > 15:
            report.write_all(self.records, a.out / "method_table.jsonl", a.docs, a.out / "method_table.png",
                             self.command, self.commit)
            self.last_write = time.time()
        else:
            report.write_jsonl(self.records, a.out / "method_table.jsonl")


def make_jobs(table, suite, row, group, methods, priority, search_note=None):
    a, p = table.args, table.protocols[suite]
    if table.done_already(suite, row, methods):
        print(f"[{suite}] {row}: done already; skipped", flush=True)
        return []
    lr = p["full_lr"] if "full" in methods else p["lr"]
    row_dir = table.work / suite / row
    protocol = table.protocol(suite, methods, row)
    jobs = []
    if suite == "language":
        config = language_config(a, p, methods, row_dir / "run", lr)
        row_dir.mkdir(parents=True, exist_ok=True)
        import yaml
        (row_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        run_command = f"mambapeft train {row_dir / 'config.yaml'}"
        jobs.append({"suite": suite, "row": row, "config": config, "run_dir": str(row_dir / "run"),
                     "done": str(row_dir / "result.json"), "device": a.device, "protocol": protocol,
                     "priority": priority})
    else:
        tasks = vision_tasks(a.vision_suite, a.vision_tasks)
        run_command = "for T in " + " ".join(tasks) + "; do mambapeft train src/mambapeft/vision/vtab.yaml " + \
            shlex.join(vision_overrides(a, p, methods, "$T", f"{row_dir}/$T/run", lr)) + "; done"
        for t in tasks:
            jobs.append({"suite": suite, "row": row, "task": t, "device": a.device, "protocol": protocol,
                         "overrides": vision_overrides(a, p, methods, t, row_dir / t / "run", lr),
                         "run_dir": str(row_dir / t / "run"), "done": str(row_dir / t / "result.json"),
                         "priority": priority})
    table.parts[(suite, row)] = {"group": group, "methods": methods, "jobs": len(jobs), "done": [],
                                 "order": [j["task"] for j in jobs if j.get("task")],
                                 "run_command": run_command, "search_note": search_note}
    pending = []
    for j in jobs:   # a vision task finished before a kill is not run again
        f = Path(j["done"])
        if f.is_file() and json.loads(f.read_text()).get("protocol") == protocol:
            table.finish_job(suite, row, json.loads(f.read_text()))
        else:
            pending.append(j)
    return pending


def parse_epochs(text):
    """'3' (both suites) or 'language=3,vision=10'."""
    out = {}
    for part in (text or "").split(","):
        if not part:
            continue
        key, _, value = part.rpartition("=")
        for suite in ([key] if key else ["language", "vision"]):
            if suite not in ("language", "vision"):
                raise SystemExit(f"method_table: --epochs {text!r}: expected N or language=N,vision=M")
            out[suite] = float(value)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lm", help="Mamba LM directory with its tokenizer")
    ap.add_argument("--vim", help="VisionMamba directory (img_size 32)")
    ap.add_argument("--language-suite", help="OUT/language of `mambapeft build-corpora OUT`")
    ap.add_argument("--vision-suite", help="OUT/vision of `mambapeft build-corpora OUT`")
    ap.add_argument("--suite", choices=["language", "vision", "both"], default="both")
    ap.add_argument("--only", help="comma-separated rows (e.g. lora_X,full,hybrid); default: every row")
    ap.add_argument("--dora", default="lora_X", help="LoRA variants that get a DoRA row: a comma list or 'all'")
    ap.add_argument("--workers", type=int, default=12, help="training processes at once (they share the GPU)")
    ap.add_argument("--epochs", help=f"N for both suites or language=N,vision=M (default language="
                    f"{LANGUAGE['epochs']}, vision={VISION['epochs']})")
    ap.add_argument("--vision-tasks", type=lambda t: t.split(","), help="comma list of vision tasks (default: all)")
    ap.add_argument("--search-trials", type=int, default=4, help="trials per search step, per suite")
    ap.add_argument("--search-tasks", help="vision tasks the search's objective averages (default: the first "
                    "task of each group)")
    ap.add_argument("--search-workers", type=int, default=2, help="search processes per suite")
    ap.add_argument("--time-limit", type=float, help="seconds after which no new run starts (the report is "
                    "written with the rows done)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the .jsonl and .png go")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "method_table.md")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "method_table", help="run directories")
    ap.add_argument("--commit", help="the commit recorded with each row (default: git rev-parse HEAD; give it "
                    "where the tree is a copy without .git)")
    ap.add_argument("--smoke", action="store_true", help="a few rows, a few steps, on CPU (with stand-in models)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table, plot and findings from the .jsonl")
    a = ap.parse_args(argv)
    a.out, a.docs, a.work = a.out.resolve(), a.docs.resolve(), a.work.resolve()
    if a.report_only:
        records = report.read_records(a.out / "method_table.jsonl")
        first = records[0] if records else {}
        report.write_all(records, a.out / "method_table.jsonl", a.docs, a.out / "method_table.png",
                         first.get("command"), first.get("commit"))
        print(f"wrote {a.docs} and {a.out / 'method_table.png'} from {len(records)} records")
        return 0
    suites = ["language", "vision"] if a.suite == "both" else [a.suite]
    need = {"language": ("lm", "language_suite"), "vision": ("vim", "vision_suite")}
    for s in suites:
        for key in need[s]:
            if not getattr(a, key) or not Path(getattr(a, key)).exists():
                raise SystemExit(f"method_table: --{key.replace('_', '-')}: expected an existing directory "
                                 f"for the {s} suite, got {getattr(a, key)!r}")
    protocols = {"language": dict(LANGUAGE), "vision": dict(VISION)}
    for s, e in parse_epochs(a.epochs).items():
        protocols[s]["epochs"] = e
    only = set(a.only.split(",")) if a.only else None
    if a.smoke:
        a.device = "cpu"
        only = only or {"lora_X", "full", "hybrid"}
        a.search_trials, a.search_workers, a.workers = min(a.search_trials, 2), 1, min(a.workers, 2)
        if "vision" in suites:
            a.vision_tasks = a.vision_tasks or vision_tasks(a.vision_suite)[:2]
            a.search_tasks = a.search_tasks or vision_tasks(a.vision_suite)[0]
        for p in protocols.values():
            p.update(max_steps=4, search_max_steps=2)
        protocols["language"]["note"] = protocols["vision"]["note"] = "Smoke run: a few steps on stand-in models."
    for s in suites:
        p = protocols[s]
        p.update(model=str(Path(a.lm if s == "language" else a.vim).resolve()),
                 suite=str(Path(a.language_suite if s == "language" else a.vision_suite).resolve()))
        if s == "vision":
            p["tasks"] = vision_tasks(a.vision_suite, a.vision_tasks)
    if only:
        known = {r for s in suites for r, _, _ in rows_for(s, a.dora)} | {"hybrid"}
        if only - known:
            raise SystemExit(f"method_table: --only: no row {', '.join(sorted(only - known))}; the rows are "
                             f"{', '.join(sorted(known))}")
    a.work.mkdir(parents=True, exist_ok=True)
    os.environ["TQDM_DISABLE"] = "1"   # the scorer's progress bars, in every worker and search process
    table = Table(a, protocols, a.work)
    started = time.time()

    jobs = []
    for s in suites:
        for i, (row, group, methods) in enumerate(rows_for(s, a.dora)):
            if only is None or row in only:
                jobs += make_jobs(table, s, row, group, methods, priority=i)
    searches = {}
    for s in suites:
        if (only is None or "hybrid" in only) and table.hybrid_done(s):
            print(f"[{s}] hybrid: done already (search and row); skipped", flush=True)
        elif only is None or "hybrid" in only:
            path = search_config(a, s, protocols[s], a.work)
            procs, cmd = start_search(path, a.search_workers, a.work)
            searches[s] = {"path": path, "procs": procs, "command": cmd}
            print(f"[{s}] search started: {cmd} ({a.search_workers} process(es))", flush=True)
    print(f"{len(jobs)} run(s) to do on {a.workers} worker process(es); {len(table.records)} row record(s) kept",
          flush=True)
    threads = max(1, (os.cpu_count() or 2) // (a.workers + a.search_workers * len(searches)))
    failed = []
    try:
        schedule(a, table, jobs, searches, threads, started, failed)
    finally:   # also after an interrupt: the rows done so far reach the outputs, no search is left running
        for info in searches.values():
            for proc, log in info["procs"]:
                proc.terminate()
                log.close()
        table.write(force=True)
    print(f"wrote {a.out / 'method_table.jsonl'} ({len(table.records)} records), {a.docs}, "
          f"{a.out / 'method_table.png'} in {time.time() - started:.0f} s", flush=True)
    for f in failed:
        print(f"not done: {f}", file=sys.stderr)
    return 1 if failed else 0


def schedule(a, table, jobs, searches, threads, started, failed):
    """Keep the workers busy with the most urgent runs (a finished search's hybrid row first, then
    rows_for's order); each finished row goes to the outputs at once."""
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(a.workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        running = {}
        while jobs or running or searches:
            late = a.time_limit is not None and time.time() - started > a.time_limit
            if late and jobs:
                print(f"time limit {a.time_limit:.0f} s: {len(jobs)} run(s) not started", flush=True)
                failed += [f"{j['suite']}/{j['row']}: not started (time limit)" for j in jobs]
                jobs = []
            for s in list(searches):   # a finished search adds its hybrid row, first in the queue
                info = searches[s]
                codes = [proc.poll() for proc, _ in info["procs"]]
                if None in codes and not late:
                    continue
                for proc, log in info["procs"]:
                    proc.terminate()
                    log.close()
                del searches[s]
                if None in codes:
                    failed.append(f"{s}/hybrid: search stopped (time limit)")
                elif any(codes):
                    failed.append(f"{s}/hybrid: search failed (exit {codes}; logs in {a.work})")
                    print(f"[{s}] search failed: see {a.work}/search-{s}.worker*.log", flush=True)
                else:
                    methods, note = search_best(info["path"])
                    print(f"[{s}] search done in {time.time() - started:.0f} s: {note}: "
                          f"{report.methods_text(methods)}", flush=True)
                    jobs = make_jobs(table, s, "hybrid", "Combination", methods, priority=-1,
                                     search_note=f"`{info['command']}`, {a.search_trials} trials per step; "
                                     f"{note}") + jobs
            while jobs and len(running) < a.workers:
                jobs.sort(key=lambda j: j["priority"])
                job = jobs.pop(0)
                try:
                    running[pool.submit(run_job, job)] = job
                except cf.process.BrokenProcessPool:   # a worker died (killed for memory?): stop starting runs
                    failed += [f"{j['suite']}/{j['row']}: not started (a worker process died)" for j in [job, *jobs]]
                    jobs = []
            if not running:
                time.sleep(1)
                continue
            done, _ = cf.wait(running, timeout=1, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                name = f"{job['suite']}/{job['row']}" + (f"/{job['task']}" if job.get("task") else "")
                try:
                    result = fut.result()
                except Exception as e:   # one failed run: reported, the others go on
                    line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    failed.append(f"{name}: {type(e).__name__}: {line}")
                    print(f"FAILED {name}: {type(e).__name__}: {line}", flush=True)
                    continue
                record = table.finish_job(job["suite"], job["row"], result)
                if record:
                    mem = "n/a" if record["peak_mem_mb"] is None else f"{record['peak_mem_mb']:.0f} MiB"
                    print(f"[{time.time() - started:5.0f} s] {record['suite']:<8} {record['row']:<18} mean "
                          f"{record['mean']:5.1f}  params {record['trainable_params']:>10,d}  train "
                          f"{record['train_s']:6.1f} s  peak {mem}", flush=True)

if __name__ == "__main__":
    sys.exit(main())

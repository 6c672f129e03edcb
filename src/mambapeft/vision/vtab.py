"""The VTAB-1k run: one method configuration over any of the 19 tasks, a result JSON per task
(a rerun skips the tasks that have one), one worker process per GPU taking tasks from a queue, and a
summary with the three group means and the unweighted 19-task mean (the paper's headline number)."""
import copy
import json
import os
import queue
import shutil
import time
import traceback
from pathlib import Path

import torch

from ..io import read_weights, write_json
from ..peft.config import ConfigError, PeftConfig
from ..peft.presets import preset

# name -> (group, classes), in the order of the VTAB paper's tables
VTAB_TASKS = {
    "cifar": ("Natural", 100), "caltech101": ("Natural", 102), "dtd": ("Natural", 47),
    "oxford_flowers102": ("Natural", 102), "oxford_iiit_pet": ("Natural", 37), "svhn": ("Natural", 10),
    "sun397": ("Natural", 397),
    "patch_camelyon": ("Specialized", 2), "eurosat": ("Specialized", 10), "resisc45": ("Specialized", 45),
    "diabetic_retinopathy": ("Specialized", 5),
    "clevr_count": ("Structured", 8), "clevr_dist": ("Structured", 6), "dmlab": ("Structured", 6),
    "kitti": ("Structured", 4), "dsprites_loc": ("Structured", 16), "dsprites_ori": ("Structured", 16),
    "smallnorb_azi": ("Structured", 18), "smallnorb_ele": ("Structured", 9),
}
GROUPS = ("Natural", "Specialized", "Structured")
PROTOCOL = Path(__file__).with_name("vtab.yaml")
RESULT = "result.json"
WHOLE = ("model", "methods")   # a config's model / methods replace the defaults' rather than merge into them


# ---- configuration --------------------------------------------------------------------------
def _merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path):
    from ..training.config import read_yaml as read_file
    data = read_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of model, methods, task, training, output_dir")
    return data


def load_config(path, overrides=()):
    """The protocol's defaults (vtab.yaml), the file at `path` over them (its model and methods
    replace the defaults'), then `key.sub=value` overrides; validated as `mambapeft train` does."""
    from ..training.config import apply_overrides, validate
    user = read_yaml(path)
    raw = _merge(read_yaml(PROTOCOL), {k: v for k, v in user.items() if k not in WHOLE})
    raw.update({k: v for k, v in user.items() if k in WHOLE})
    config = validate(apply_overrides(raw, overrides), str(path))
    task = config["task"]
    if task.get("type") != "vision":
        raise ConfigError(f"{path}: task.type: mambapeft vtab runs the 'vision' task, got {task.get('type')!r}")
    if "data" in task:
        raise ConfigError(f"{path}: task.data names one task folder; mambapeft vtab takes task.root, the "
                          "folder holding the task folders")
    if task.get("suite") == "default":
        task.pop("root", None)   # the shipped suite is the root (the protocol's root: vtab-1k does not apply)
    elif not isinstance(task.get("root"), str):
        raise ConfigError(f"{path}: task.root: expected the folder holding the VTAB-1k task folders")
    config["methods"] = peft_config(config["methods"], f"{path}: methods").to_dict()["methods"]
    return config


def peft_config(methods, source):
    """A Vim preset name or a mapping of methods; the new head always trains."""
    if isinstance(methods, str):
        return preset(methods, "vim")
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{source}: expected a Vim preset name or a mapping of methods to settings")
    try:
        return PeftConfig({"head": {}, **methods}).validate_for("vim")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def task_table(config=None):
    """{task: (group, classes)}: VTAB-1k's 19, or the shipped suite's with task.suite: default."""
    if config is None or config["task"].get("suite") != "default":
        return VTAB_TASKS
    from ..default.shipped import vision_tasks
    from ..default.vision_suite import GROUPS as SUITE_GROUPS, PROCEDURAL
    return {n: (SUITE_GROUPS[n].capitalize(), PROCEDURAL[n][1] if n in PROCEDURAL else 10)
            for n in sorted(vision_tasks(), key=lambda n: (GROUPS.index(SUITE_GROUPS[n].capitalize()), n))}


def select_tasks(names, table=VTAB_TASKS):
    names = list(names or table)
    bad = [n for n in names if n not in table]
    if bad:
        what = "VTAB-1k task(s)" if table is VTAB_TASKS else "task(s) of the suite"
        raise ConfigError(f"unknown {what} {', '.join(bad)}; expected some of {', '.join(table)}")
    return list(dict.fromkeys(names))


# ---- one task ---------------------------------------------------------------------------------
def build_task(config, name):
    from .task import VisionTask
    return VisionTask({**config["task"], "data": name}, f"task ({name})")


def run_task(config, name, out_dir, log=print, progress=True):
    """Train and test one task on the engine in OUT/<name>/run; writes OUT/<name>/result.json
    (atomically) and returns the result."""
    from .data import DataError, plain_message
    try:
        return _run_task(config, name, out_dir, log, progress)
    except DataError as e:  # an image that fails to decode in a DataLoader worker: its one line
        raise DataError(plain_message(e)) from None


def _run_task(config, name, out_dir, log, progress):
    from ..training import logs
    from ..training.trainer import CONFIG, train
    started = time.time()
    task = build_task(config, name)
    run_dir = Path(out_dir) / name / "run"
    resume = (run_dir / CONFIG).is_file()   # a run stopped part way continues from its last checkpoint
    if run_dir.is_dir() and not resume:     # killed before it wrote its config: nothing to keep
        shutil.rmtree(run_dir)
    run_config = {**config, "task": {**config["task"], "data": name}, "output_dir": str(run_dir),
                  "training": {**config["training"], "progress": progress and config["training"]["progress"]}}
    metrics = train(run_config, task=task, resume=resume)
    test = metrics["test"]
    adapter = read_weights(run_dir / "last" / "adapter_model.safetensors")
    t = config["training"]
    result = {"task": name, "group": task_table(config)[name][0], "top1": 100 * test["acc"], "test_loss": test["loss"],
              "test_samples": int(test["samples"]), "train_samples": len(task.train_set()),
              "num_classes": task.num_classes, "trainable_params": sum(v.numel() for v in adapter.values()),
              "steps": metrics["steps"], "tested_step": metrics["best_step"],
              "train_loss": epoch_losses(logs.read(run_dir / logs.LOG)), "seconds": time.time() - started,
              "device": t["device"] if t["device"] != "auto" else "cuda" if torch.cuda.is_available() else "cpu",
              "methods": config["methods"], "config": fingerprint(config)}
    if metrics.get("validation"):
        result["validation"] = metrics["validation"]
    if (metrics.get("base") or {}).get("test"):   # training.eval_base: the model before any update
        result["base_top1"] = 100 * metrics["base"]["test"]["acc"]
    write_json(Path(out_dir) / name / RESULT, result)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)   # resume state of a finished task; last/ stays
    before = f"{result['base_top1']:.2f} -> " if "base_top1" in result else ""
    log(f"[{name}] top-1 {before}{result['top1']:.2f} ({result['test_samples']} test images)")
    return result


def fingerprint(config):
    """What decides a task's result: a rerun with another one must not skip the finished tasks."""
    from ..training.trainer import RESUMABLE
    return json.loads(json.dumps({
        "model": config["model"], "methods": config["methods"],
        "task": {k: v for k, v in config["task"].items() if k not in ("root", "num_workers", "eval_batch_size")},
        "training": {k: v for k, v in config["training"].items() if k not in RESUMABLE}}))


def epoch_losses(records):
    """Mean training loss of each epoch from the engine's log records."""
    train = [r for r in records if "split" not in r and "loss" in r]
    if not train:
        return []
    per_epoch = max(1, round(train[0]["step"] / train[0]["epoch"]))
    sums = {}
    for r in train:
        sums.setdefault((r["step"] - 1) // per_epoch, []).append(r["loss"])
    return [sum(v) / len(v) for _, v in sorted(sums.items())]


# ---- the run --------------------------------------------------------------------------------
def run_vtab(config, names, out_dir, workers=None, log=print):
    """Every task of `names` without a result in `out_dir`; several at once on several GPUs.
    Returns {task: error line} for the tasks that failed (the others still run)."""
    out_dir = Path(out_dir)
    names = select_tasks(names, task_table(config))
    done = [n for n in names if (out_dir / n / RESULT).is_file()]
    for n in done:
        f = out_dir / n / RESULT
        old = json.loads(f.read_text()).get("config")
        if old is not None and old != fingerprint(config):
            key = next(k for k in fingerprint(config) if fingerprint(config)[k] != old.get(k))
            raise ConfigError(f"{f}: made with another config ({key} differs); choose a new output "
                              "directory, or delete the task's folder to redo it")
        log(f"[{n}] done already ({f}); skipped")
    todo = [n for n in names if n not in done]
    for n in todo:  # bad data stops the run before any training, with its file and line
        build_task(config, n)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", config)
    gpus = torch.cuda.device_count()
    workers = min(len(todo), workers or max(1, gpus))
    if workers <= 1:   # in this process; the first failure stops the run
        for n in todo:
            run_task(config, n, out_dir, log)
        return {}
    return _run_parallel(config, todo, out_dir, workers, gpus, log)


def _worker(rank, gpus, config, out_dir, tasks, results, threads):
    # before any CUDA call: this process sees one GPU, as cuda:0
    if gpus:   # the parent's visible GPUs, when it was given a list, else 0..gpus-1
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        ids = visible if len(visible) == gpus else [str(i) for i in range(gpus)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[rank % gpus].strip()
    torch.set_num_threads(threads)
    while (name := tasks.get()) is not None:   # one None per worker ends the queue
        try:
            run_task(config, name, out_dir, log=lambda msg: print(msg, flush=True), progress=False)
            results.put((name, None))
        except Exception as e:  # report and go on with the next task
            line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            if isinstance(e, ValueError):   # a user mistake (bad data, config): its one line
                results.put((name, line))
            else:
                traceback.print_exc()
                results.put((name, f"{type(e).__name__}: {line}"))


def _run_parallel(config, todo, out_dir, workers, gpus, log):
    ctx = torch.multiprocessing.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for n in [*todo, *[None] * workers]:
        tasks.put(n)
    threads = max(1, torch.get_num_threads() // workers)
    procs = [ctx.Process(target=_worker, args=(r, gpus, config, str(out_dir), tasks, results, threads))
             for r in range(workers)]
    for p in procs:
        p.start()
    log(f"{len(todo)} task(s) on {workers} worker process(es)" + (f" over {gpus} GPU(s)" if gpus else ""))
    errors, finished = {}, 0
    while finished < len(todo):
        try:
            name, error = results.get(timeout=5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        finished += 1
        if error:
            errors[name] = error
    for p in procs:
        p.join()
    for n in todo:
        if n not in errors and not (Path(out_dir) / n / RESULT).is_file():
            errors[n] = "the worker process ended without a result"
    return errors


# ---- the summary ----------------------------------------------------------------------------
def read_results(out_dir, table=VTAB_TASKS):
    results = {}
    for name in table:
        f = Path(out_dir) / name / RESULT
        if f.is_file():
            results[name] = json.loads(f.read_text())
    return results


def summarize(out_dir, table=VTAB_TASKS):
    """summary.json, summary.md and summary.png in `out_dir` from every task result there; `table`:
    the tasks and groups (task_table), VTAB-1k's by default."""
    out_dir = Path(out_dir)
    results = read_results(out_dir, table)
    groups = {}
    for g in GROUPS:
        scores = [results[n]["top1"] for n in table if table[n][0] == g and n in results]
        size = sum(1 for n in table if table[n][0] == g)
        groups[g] = {"mean": sum(scores) / len(scores) if scores else None, "tasks": len(scores), "of": size}
    scores = [r["top1"] for r in results.values()]
    summary = {"tasks": {n: r["top1"] for n, r in results.items()}, "groups": groups,
               "mean": sum(scores) / len(scores) if scores else None, "complete": len(results) == len(table),
               "count": len(results), "of": len(table)}
    base = {n: r["base_top1"] for n, r in results.items() if "base_top1" in r}
    if base:
        summary["base"] = base
    write_json(out_dir / "summary.json", summary)
    from ..io import atomic_path
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(_markdown(results, summary, table))
    if results:
        _plot(results, summary, out_dir / "summary.png", table)
    return summary


def _fmt(x):
    return "–" if x is None else f"{x:.1f}"


def _markdown(results, s, table=VTAB_TASKS):
    n_all = len(table)
    lines = ["# VTAB-1k top-1 (%)" if table is VTAB_TASKS else "# Top-1 (%) on the shipped vision suite", ""]
    if not s["complete"]:
        lines += [f"{s['count']} of {n_all} tasks so far: the means are over the tasks done.", ""]
    head = [g for g in GROUPS]
    lines += ["| " + " | ".join(head + [f"Mean ({n_all} tasks)"]) + " |", "|" + "---:|" * (len(head) + 1)]
    cells = [f"{_fmt(s['groups'][g]['mean'])} ({s['groups'][g]['tasks']}/{s['groups'][g]['of']})" for g in GROUPS]
    lines += ["| " + " | ".join(cells + [f"{_fmt(s['mean'])} ({s['count']}/{n_all})"]) + " |", ""]
    base = s.get("base") or {}
    lines += ["| Task | Group | Classes | " + ("Base top-1 | " if base else "") + "Top-1 | Trainable params |",
              "|---|---|---:|" + ("---:|" if base else "") + "---:|---:|"]
    for n, (g, _) in table.items():
        r = results.get(n)
        lines.append(f"| {n} | {g} | {r['num_classes'] if r else '–'} | " + (f"{_fmt(base.get(n))} | " if base else "")
                     + f"{_fmt(r['top1']) if r else '–'} | {format(r['trainable_params'], ',d') if r else '–'} |")
    return "\n".join(lines) + "\n"


def _plot(results, s, path, table=VTAB_TASKS):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..io import atomic_path
    colors = {"Natural": "tab:green", "Specialized": "tab:blue", "Structured": "tab:orange"}
    names = [n for n in table if n in results]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 3), 4.5))
    ax.bar(range(len(names)), [results[n]["top1"] for n in names],
           color=[colors[table[n][0]] for n in names])
    for g in GROUPS:
        idx = [i for i, n in enumerate(names) if table[n][0] == g]
        if idx:
            ax.hlines(s["groups"][g]["mean"], idx[0] - 0.4, idx[-1] + 0.4, colors="k", linestyles="--")
            ax.bar(0, 0, color=colors[g], label=f"{g}: {s['groups'][g]['mean']:.1f}")
    ax.axhline(s["mean"], color="gray", lw=0.8, label=f"mean of {s['count']}: {s['mean']:.1f}")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(("VTAB-1k" if table is VTAB_TASKS else "shipped vision suite") + " (dashed: group means)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

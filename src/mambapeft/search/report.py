"""Outputs of a search: the best configuration as a `mambapeft train` config, a Markdown report with
the table of trials, and plots (optimisation history, parameter importances, score vs size)."""
import math
from pathlib import Path

import yaml
from optuna.trial import TrialState

from ..io import atomic_path, write_json


def write_best(cfg, study):
    """best.yaml, a config `mambapeft train` runs as is (and best-task{i}.yaml for each task when
    there are several; best.yaml is then task 0's); returns the paths."""
    from .objective import train_config
    methods = study.best_trial.user_attrs["methods"]
    out, paths = Path(cfg["output_dir"]), []
    n = len(cfg["tasks"])
    files = [("best.yaml", 0, "best-run")] + [(f"best-task{i}.yaml", i, f"best-run-task{i}") for i in range(n) if n > 1]
    for name, i, run in files:
        config = train_config(cfg, i, methods, out.resolve() / run, quiet=False)
        with atomic_path(out / name) as tmp:
            tmp.write_text(f"# best of study {study.study_name} (trial {study.best_trial.number}, "
                           f"validation {study.best_value:.6g})\n" + yaml.safe_dump(config, sort_keys=False))
        paths.append(out / name)
    return paths


def _fmt(v):
    return "" if v is None else f"{v:.5g}" if isinstance(v, float) else str(v)


def _methods_text(methods):
    parts = []
    for name, settings in (methods or {}).items():
        inner = ", ".join(f"{k}={_fmt(v)}" for k, v in settings.items())
        parts.append(f"{name}({inner})" if inner else name)
    return " ".join(parts)


def trials_table(study):
    rows = ["| # | state | validation | per task | trainable | seconds | methods | note |",
            "|---|---|---|---|---|---|---|---|"]
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else None
        note = t.user_attrs.get("note", "") or t.user_attrs.get("failed", "")
        if "failed_trial" in t.system_attrs:
            note = (note + f" retry of trial {t.system_attrs['failed_trial']} (its worker died)").strip()
        if t.state == TrialState.PRUNED and t.intermediate_values and not note:
            note = f"pruned after {len(t.intermediate_values)} report(s)"
        scores = " / ".join(_fmt(x) for x in t.user_attrs.get("scores", []))
        size = _fmt(t.user_attrs.get("trainable"))
        rows.append(f"| {t.number} | {t.state.name} | {_fmt(t.value)} | {scores} | {size} | {_fmt(seconds)} "
                    f"| {_methods_text(t.user_attrs.get('methods'))} | {note} |")
    return "\n".join(rows)


def write_report(cfg, studies, final=None):
    """report.md and the plots under OUTPUT_DIR; `studies` in step order; `final`: the test scores
    ({study, trial, tasks: [{task, metric, test}]}), also written to final.json."""
    out = Path(cfg["output_dir"])
    lines = [f"# Search report: {cfg['search']['study']}", "",
             f"Config `{cfg['source']}`, storage `{redact(cfg['search']['storage'])}`.", ""]
    for study in studies:
        counts = {s.name: 0 for s in TrialState}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name] += 1
        lines += [f"## {study.study_name}", "",
                  ", ".join(f"{n.lower()} {c}" for n, c in counts.items() if c) + ".", ""]
        if "chosen" in study.user_attrs:
            lines += [f"Tunes step 1's best set: {', '.join(study.user_attrs['chosen']) or '(none)'}.", ""]
        if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            b = study.best_trial
            lines += [f"Best: trial {b.number}, validation {b.value:.6g}: {_methods_text(b.user_attrs['methods'])}", ""]
        for name, path in plot_study(study, out).items():
            lines.append(f"![{name}]({path.name})")
        lines += ["", trials_table(study), ""]
    if final:
        tasks = final["tasks"]
        final["mean_test"] = sum(r["test"] for r in tasks) / len(tasks)
        lines += ["## Test split (evaluated once, for the final configuration; never seen by the search)", "",
                  f"Best trial {final['trial']} of {final['study']}, trained once more per task.", "",
                  "| task | metric | test |", "|---|---|---|"]
        lines += [f"| {r['task'].get('name', r['task']['type'])} | {r['metric']} | {r['test']:.6g} |" for r in tasks]
        lines += ["", f"Mean test {tasks[0]['metric']}: {final['mean_test']:.6g}", ""]
        write_json(out / "final.json", final)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out / "report.md"


def redact(url):
    """A database URL without its password, for the report."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


def plot_study(study, out):
    """history, importances and score-vs-trainable PNGs of one study; returns {title: path}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        return {}
    maximize = study.direction.name == "MAXIMIZE"
    paths = {}

    def save(fig, kind):
        path = Path(out) / f"{study.study_name}.{kind}.png"
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        paths[kind] = path

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = [t.number for t in done], [t.value for t in done]
    best = [max(ys[:i + 1]) if maximize else min(ys[:i + 1]) for i in range(len(ys))]
    ax.scatter(xs, ys, s=14, label="trial")
    ax.step(xs, best, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel="validation score", title=f"{study.study_name}: optimisation history")
    ax.legend()
    save(fig, "history")

    importances = _importances(study)
    if importances:
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(importances) + 1.2))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title=f"{study.study_name}: parameter importances")
        save(fig, "importances")

    sized = [t for t in done if t.user_attrs.get("trainable")]
    if sized:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([t.user_attrs["trainable"] for t in sized], [t.value for t in sized], s=14)
        ax.set_xscale("log")
        ax.set(xlabel="trainable parameters", ylabel="validation score",
               title=f"{study.study_name}: score vs trainable parameters")
        save(fig, "size")
    return paths


def _importances(study):
    """fANOVA importances, or {} when they are undefined (too few trials, a single parameter value)."""
    import optuna
    try:
        imp = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}
    return {k: v for k, v in imp.items() if math.isfinite(v)}

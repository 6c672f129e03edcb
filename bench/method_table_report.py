"""The method table's outputs from finished row records (bench/method_table.py writes them): the
Markdown tables per suite in the paper's grouping, the plot of mean accuracy against trainable
parameters, and findings computed from the numbers (nothing here knows a result in advance).

A record: {"suite", "row", "group", "methods", "tasks": {task: accuracy %}, "test_samples": {task: n},
"mean", "trainable_params", "train_s", "wall_s", "peak_mem_mb" (None off GPU), "device", ...}."""
import json
import math
from pathlib import Path

# The paper's grouping (METHODS.md §1), then the rows that are not one method.
GROUPS = ["LoRA", "Partial LoRA", "DoRA", "Partial tuning", "Prompt tuning", "Affix tuning", "Additional-scan",
          "Parallel adapter", "Baseline", "Combination"]
COMBINED = ("all", "hybrid")          # every method at once, the search's best
SUITES = ("language", "vision")


def read_records(path):
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def mean_stderr(record):
    """Binomial standard error (in points) of the row's mean accuracy: each task's test accuracy is a
    proportion over its test items, and the tasks are independent."""
    n = record.get("test_samples") or {}
    tasks = record["tasks"]
    if not tasks or any(not n.get(t) for t in tasks):
        return None
    var = sum((p / 100) * (1 - p / 100) / n[t] for t, p in tasks.items())
    return 100 * math.sqrt(var) / len(tasks)


def suite_records(records, suite):
    """The finished rows of one suite, best mean first (ties: fewer parameters first)."""
    rows = [r for r in records if r["suite"] == suite and r.get("mean") is not None]
    return sorted(rows, key=lambda r: (-r["mean"], r["trainable_params"], r["row"]))


def single_methods(rows):
    """Rows that train one PEFT method (DoRA variants included; baselines and combinations not)."""
    return [r for r in rows if r["group"] not in ("Baseline", "Combination")]


def group_means(record):
    """{group: mean accuracy} over the record's tasks by their task_groups (vision: natural, specialized,
    structured); {} when the record has no groups."""
    groups = record.get("task_groups") or {}
    out = {}
    for t, g in groups.items():
        if t in record["tasks"]:
            out.setdefault(g, []).append(record["tasks"][t])
    return {g: mean(v) for g, v in out.items()}


def methods_text(methods):
    """{"lora_X": {"r": 12, "scale": 0.0683}} -> "lora_X(r=12, scale=0.068)"."""
    parts = []
    for name, settings in methods.items():
        inner = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())
        parts.append(f"{name}({inner})" if inner else name)
    return " ".join(parts)


def _params(n):
    return f"{n:,d}"


def _mem(r):
    return "n/a" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"


def markdown_suite(records, suite):
    rows = suite_records(records, suite)
    if not rows:
        return [f"## {suite.capitalize()} suite", "", "No finished rows.", ""]
    tasks = list(rows[0]["tasks"])
    groups = list(group_means(rows[0]))
    rank = {r["row"]: i + 1 for i, r in enumerate(rows)}
    base = next((r for r in rows if r["row"] == "full"), None)
    lines = [f"## {suite.capitalize()} suite", "",
             f"{len(rows)} rows on {rows[0].get('device', '?')}; accuracy in % on each task's test split; "
             f"rank by mean over all rows; ± the binomial standard error of the mean; params: trainable; "
             f"time: the training steps' seconds" + (f", with up to {rows[0]['concurrent_runs']} runs sharing the "
                                                    f"device" if rows[0].get("concurrent_runs") else "") +
             "; memory: peak allocated (MiB)." +
             (f" {rows[0]['protocol_note']}" if rows[0].get("protocol_note") else ""), ""]
    head = ["rank", "method", *tasks, *[f"{g} mean" for g in groups], "mean", "params", "% of full", "time (s)",
            "memory"]
    lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for group in GROUPS:
        members = [r for r in rows if r["group"] == group]
        if not members:
            continue
        lines.append(f"| | **{group}** |" + " |" * (len(head) - 2))
        for r in members:   # already best first
            se = mean_stderr(r)
            share = f"{100 * r['trainable_params'] / base['trainable_params']:.2f}" if base else "–"
            gm = group_means(r)
            cells = [str(rank[r["row"]]), f"`{r['row']}`", *[f"{r['tasks'].get(t, float('nan')):.1f}" for t in tasks],
                     *[f"{gm[g]:.1f}" if g in gm else "–" for g in groups],
                     f"**{r['mean']:.1f}**" + (f" ± {se:.1f}" if se is not None else ""),
                     _params(r["trainable_params"]), share, f"{r['train_s']:.1f}", _mem(r)]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    hybrid = next((r for r in rows if r["row"] == "hybrid"), None)
    if hybrid:
        lines += [f"`hybrid` trains the best configuration of the search ({hybrid.get('search_note', '')}): "
                  f"`{methods_text(hybrid['methods'])}`.", ""]
    return lines


def gap(a, b):
    """a's mean minus b's, and a note when that is within twice the standard error of the difference."""
    d = a["mean"] - b["mean"]
    sa, sb = mean_stderr(a), mean_stderr(b)
    se = math.sqrt(sa ** 2 + sb ** 2) if sa is not None and sb is not None else None
    clear = se is None or abs(d) > 2 * se
    return d, ("" if clear else f" (within noise: 2 standard errors are {2 * se:.1f} points)")


def verdict(d, noise):
    """Whether a claim "A beats B" holds, given A - B and gap()'s noise note."""
    return "undecided" if noise else "reproduces" if d > 0 else "does not reproduce"


def findings(records, suite):
    """Sentences about the paper's claims, each computed from this suite's rows."""
    rows = suite_records(records, suite)
    by = {r["row"]: r for r in rows}
    singles = single_methods(rows)
    out = []
    if not rows:
        return out

    full = by.get("full")
    if full and singles:
        best = max(singles, key=lambda r: r["mean"])
        beat = [r for r in singles if r["mean"] > full["mean"]]
        d, noise = gap(best, full)
        out.append(f"PEFT beats full fine-tuning ({verdict(d, noise)}): the best single method, `{best['row']}`, "
                   f"scores {best['mean']:.1f} against full fine-tuning's {full['mean']:.1f} ({d:+.1f} points{noise}) "
                   f"with {100 * best['trainable_params'] / full['trainable_params']:.2f}% of its trainable "
                   f"parameters; {len(beat)} of {len(singles)} single methods beat full fine-tuning.")
    if "lora_X" in by and singles:
        ranked = sorted(singles, key=lambda r: -r["mean"])
        pos = [r["row"] for r in ranked].index("lora_X") + 1
        top = max(1, math.ceil(len(ranked) / 4))
        d, noise = gap(by["lora_X"], ranked[0]) if ranked[0]["row"] != "lora_X" else (0.0, "")
        verdict_x = "reproduces" if pos <= top else "undecided" if noise else "does not reproduce"
        out.append(f"LoRA_p(X) is among the best ({verdict_x}): `lora_X` ranks {pos} of {len(ranked)} single methods "
                   f"(top quarter: rank <= {top}) with {by['lora_X']['mean']:.1f}" +
                   ("" if pos == 1 else f", {d:+.1f} points from the best, `{ranked[0]['row']}`{noise}") + ".")
    if "hybrid" in by and singles:
        best = max(singles, key=lambda r: r["mean"])
        d, noise = gap(by["hybrid"], best)
        out.append(f"The hybrid beats every single method ({verdict(d, noise)}): the search's best scores "
                   f"{by['hybrid']['mean']:.1f} against the best single method `{best['row']}` at "
                   f"{best['mean']:.1f} ({d:+.1f} points{noise}), with {_params(by['hybrid']['trainable_params'])} "
                   f"trainable parameters against {_params(best['trainable_params'])}.")
    if "all" in by and singles:
        best = max(singles, key=lambda r: r["mean"])
        d, noise = gap(by["all"], best)
        out.append(f"Every method at once (`all`, {_params(by['all']['trainable_params'])} parameters) scores "
                   f"{by['all']['mean']:.1f}, {d:+.1f} points from the best single method{noise}: combining "
                   f"without a search {'makes no clear difference' if noise else 'helps' if d > 0 else 'hurts'} here.")
    if "head" in by:
        above = [r for r in rows if r["row"] != "head" and r["mean"] > by["head"]["mean"]]
        others = len(rows) - 1
        out.append(f"Linear probing (`head` alone) scores {by['head']['mean']:.1f}; {len(above)} of {others} "
                   f"other rows beat it.")
    pairs = [(by[r["row"].removesuffix("+dora")], r) for r in rows
             if r["row"].endswith("+dora") and r["row"].removesuffix("+dora") in by]
    if pairs:
        wins = [(lo, do) for lo, do in pairs if do["mean"] > lo["mean"]]
        detail = ", ".join(f"`{lo['row']}` {lo['mean']:.1f} -> {do['mean']:.1f}" for lo, do in pairs)
        out.append(f"DoRA beats its LoRA in {len(wins)} of {len(pairs)} pairs ({detail}).")
    mems = sorted(r["peak_mem_mb"] for r in singles if r.get("peak_mem_mb") is not None)
    if full and full.get("peak_mem_mb") is not None and mems:
        times = sorted(r["train_s"] for r in singles)
        out.append(f"Cost: full fine-tuning peaks at {full['peak_mem_mb']:.0f} MiB and trains in "
                   f"{full['train_s']:.1f} s; the single methods' median is {mems[len(mems) // 2]:.0f} MiB "
                   f"(from {mems[0]:.0f} to {mems[-1]:.0f}) and {times[len(times) // 2]:.1f} s.")
    if singles:
        fams = {}
        for r in singles:
            fams.setdefault(r["group"], []).append(r)
        best_fam = max(fams, key=lambda g: max(x["mean"] for x in fams[g]))
        worst = min(singles, key=lambda r: r["mean"])
        out.append(f"Best family: {best_fam} (its best row "
                   f"{max(x['mean'] for x in fams[best_fam]):.1f}); weakest single method: `{worst['row']}` "
                   f"({worst['mean']:.1f}).")
    return out


def markdown(records, command=None, commit=None):
    lines = ["# Method table on the default suites", "",
             "Generated by `bench/method_table.py` from `bench/results/method_table.jsonl` (one record per row "
             "and suite, each with its command and commit); do not edit by hand.", ""]
    if command:
        lines += [f"Command: `{command}`" + (f" at commit `{commit}`." if commit else "."), ""]
    lines += ["![mean accuracy against trainable parameters](../bench/results/method_table.png)", ""]
    for suite in SUITES:
        if any(r["suite"] == suite for r in records):
            lines += markdown_suite(records, suite)
    lines += ["## Findings", "", "Computed from the rows above; \"within noise\" means the difference is within "
              "two binomial standard errors of the test accuracies (the two rows taken as independent: "
              "conservative, since they are scored on the same items).", ""]
    for suite in SUITES:
        found = findings(records, suite)
        if found:
            lines += [f"### {suite.capitalize()} suite", ""] + [f"- {f}" for f in found] + [""]
    return "\n".join(lines)


COLORS = {"LoRA": "tab:blue", "Partial LoRA": "tab:cyan", "DoRA": "tab:purple", "Partial tuning": "tab:green",
          "Prompt tuning": "tab:olive", "Affix tuning": "tab:orange", "Additional-scan": "tab:red",
          "Parallel adapter": "tab:brown", "Baseline": "black", "Combination": "tab:pink"}


def plot(records, path):
    """Mean accuracy against trainable parameters (log x), one panel per suite, like the paper's figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mambapeft.io import atomic_path
    suites = [s for s in SUITES if suite_records(records, s)]
    if not suites:
        return None
    fig, axes = plt.subplots(1, len(suites), figsize=(6.5 * len(suites), 5), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        rows = suite_records(records, suite)
        seen = set()
        for r in sorted(rows, key=lambda r: GROUPS.index(r["group"]) if r["group"] in GROUPS else len(GROUPS)):
            g = r["group"]
            marker = "*" if r["row"] in COMBINED else "s" if g == "Baseline" else "o"
            ax.scatter(r["trainable_params"], r["mean"], color=COLORS.get(g, "gray"), marker=marker,
                       s=120 if marker == "*" else 40, label=None if g in seen else g, zorder=3)
            seen.add(g)
            ax.annotate(r["row"], (r["trainable_params"], r["mean"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel("mean test accuracy (%)")
        ax.set_title(f"{suite} suite ({len(rows[0]['tasks'])} tasks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write_jsonl(records, path):
    """One line per row and suite, in a stable order, written atomically."""
    from mambapeft.io import atomic_path
    key = lambda r: (SUITES.index(r["suite"]) if r["suite"] in SUITES else 9, r["row"])  # noqa: E731
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=key)))


def write_all(records, jsonl, docs, png, command=None, commit=None):
    """The three outputs, each written atomically."""
    from mambapeft.io import atomic_path
    write_jsonl(records, jsonl)
    with atomic_path(docs) as tmp:
        tmp.write_text(markdown(records, command, commit))
    plot(records, png)

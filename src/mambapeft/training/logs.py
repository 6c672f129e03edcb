"""What a run reports: a JSON-lines log (the record a resumed run continues), TensorBoard events,
a tqdm bar, and a PNG of the training and validation curves at the end. Rank 0 only."""
import json
from pathlib import Path

from ..io import atomic_path

LOG = "log.jsonl"


class RunLog:
    def __init__(self, run_dir, start_step, enabled=True):
        self.path = Path(run_dir) / LOG
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        truncate(self.path, start_step)
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a killed run wrote after its last checkpoint
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        except ImportError:   # tensorboard is optional: the JSON log holds everything
            self.tb = None

    def write(self, record):
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read(path):
    """Records of a log, skipping a last line cut short by a kill."""
    out = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def truncate(path, step):
    """Keep only the records up to `step`: a resumed run writes the rest again, identically."""
    if not Path(path).exists():
        return
    keep = [r for r in read(path) if r["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))


def plot(run_dir):
    """curves.png: training loss per step and every validation metric against the step."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read(Path(run_dir) / LOG)
    train = [r for r in records if "split" not in r]
    val = [r for r in records if r.get("split") == "validation"]
    metrics = sorted({k for r in val for k in r if k not in ("step", "split", "epoch")})
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(5 * (1 + len(metrics)), 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train")
    if "loss" in metrics:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    for ax, m in zip(axes[0, 1:], metrics):
        ax.plot([r["step"] for r in val if m in r], [r[m] for r in val if m in r], "o-")
        ax.set(xlabel="step", ylabel=m, title=f"validation {m}")
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def progress(total, initial, enabled):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="training", unit="step", dynamic_ncols=True)


def _fmt(v):
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def summary(result, run_dir):
    """A few lines for a person: each test metric of the base model -> the fine-tuned one, the
    trainable parameters, where the adapters and the curves are."""
    run_dir = Path(run_dir)
    test, base = result.get("test") or {}, (result.get("base") or {}).get("test") or {}
    lines = [f"run: {run_dir}"]
    if "trainable_params" in result:
        t, n = result["trainable_params"], result["total_params"]
        lines.append(f"trainable parameters: {t:,d} of {n:,d} ({100 * t / max(n, 1):.2f}%)")
    keys = [k for k in test if k not in ("samples", "n") and isinstance(test[k], (int, float))]
    if keys:
        width = max(len(k) for k in keys)
        if base:
            lines.append(f"test ({result['base']['how']} -> fine-tuned):")
            lines += [f"  {k:<{width}}  {_fmt(base.get(k))} -> {_fmt(test[k])}" for k in keys]
        else:
            lines.append("test:")
            lines += [f"  {k:<{width}}  {_fmt(test[k])}" for k in keys]
    tested = "best" if (run_dir / "best").is_dir() else "last"
    lines.append(f"adapter: {run_dir / tested} (tested, step {result.get('best_step')})"
                 + (f", {run_dir / 'last'} (step {result.get('steps')})" if tested == "best" else ""))
    if (run_dir / "curves.png").is_file():
        lines.append(f"curves: {run_dir / 'curves.png'}")
    lines.append(f"metrics: {run_dir / 'metrics.json'}")
    return "\n".join(lines)

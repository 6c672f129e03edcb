"""Plot bench/results/gpu_bench.jsonl: tokens/s and peak memory of each 8x1024 training run, as
ratios to transformers + peft LoRA(in_proj) r8, with the issue's targets marked.

    python bench/plot_gpu.py   # writes bench/results/gpu_bench.png
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main():
    rows = [json.loads(line) for line in (RESULTS / "gpu_bench.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train" and "_torch" not in r["run"]]  # the kernel runs
    base = next(r for r in train if r["run"] == "hf_lora_in_proj_r8")
    names = [r["run"] for r in train]
    speed = [r.get("interleaved_tokens_per_s", r["tokens_per_s"]) / base.get("interleaved_tokens_per_s",
                                                                            base["tokens_per_s"]) for r in train]
    memory = [r["peak_mem_gib"] / base["peak_mem_gib"] for r in train]
    colors = ["tab:gray" if r["impl"] != "mambapeft" else "tab:blue" for r in train]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, values, title, target in ((axes[0], speed, "tokens/s vs transformers + peft", 1.0),
                                      (axes[1], memory, "peak memory vs transformers + peft", 0.8)):
        ax.barh(names, values, color=colors)
        ax.axvline(target, color="tab:red", ls="--", lw=1, label=f"target for LoRA_p(X): {target}")
        ax.axvline(1.0, color="black", lw=0.5)
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("mamba-130m shape, batch 8 x 1024, bf16 autocast, AdamW, H200 (mamba_ssm kernels)")
    fig.text(0.01, 0.01, "tokens/s: step-by-step interleaved runs where measured (hf_lora_in_proj_r8, lora_X_r64, "
             "affix_3, additional_scan_6), pooled rounds otherwise", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(RESULTS / "gpu_bench.png", dpi=120)
    print(f"wrote {RESULTS / 'gpu_bench.png'}")


if __name__ == "__main__":
    main()

"""Wall and CPU time of the two built-in jobs on CPU, exactly as the README runs them:
`mambapeft train examples/default_language.yaml` and `mambapeft vtab examples/default_vision.yaml`.

With the shipped models present (src/mambapeft/assets/mamba-default, vim-default) they are timed; without
them (or with --standin) random stand-ins of the same shapes (default/standin.py) are. Overrides after
`--` go to both jobs (e.g. training.max_steps=20 for a quick look; the figures then cover those steps).
The load average at the start and end is recorded: on a busy machine the wall times mean little.

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/bench_default_jobs.py --out bench/results   # 2 cores
    PYTHONPATH=src python bench/bench_default_jobs.py --jobs language --standin -- training.max_steps=10
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = {"language": ["train", "examples/default_language.yaml"], "vision": ["vtab", "examples/default_vision.yaml"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    ap.add_argument("--standin", action="store_true", help="time random stand-ins even when the real models exist")
    ap.add_argument("--out", help="folder for default_jobs_cpu.jsonl")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from mambapeft.default import shipped, standin
    work = Path(tempfile.mkdtemp(prefix="mambapeft-bench-default-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MAMBAPEFT_CACHE": str(work / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    models = {"language": ("mamba-default", standin.language_model), "vision": ("vim-default", standin.vim)}
    for job in args.jobs:
        name, make = models[job]
        real = (shipped.ASSETS / name / "config.json").is_file() and not args.standin
        model = shipped.ASSETS / name if real else make(work / name)
        out = work / f"run-{job}"
        cmd = [sys.executable, "-m", "mambapeft.cli", *JOBS[job], f"model.path={model}", "training.progress=false",
               *args.overrides] + (["--output", str(out)] if job == "vision" else [f"output_dir={out}"])
        if job == "vision":   # materialising the suite is a one-time cost, timed apart
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "from mambapeft.default.shipped import vision_suite_dir as v; v()"],
                           env=env, check=True)
            materialise_s = time.perf_counter() - t
        load0, before = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        record = {"job": job, "model": "shipped" if real else "stand-in (random, same shape)", "wall_s": round(wall, 1),
                  "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
                  "threads": os.environ.get("OMP_NUM_THREADS", "torch default"), "cores": os.cpu_count(),
                  "load_start": load0, "load_end": os.getloadavg()[0], "overrides": args.overrides,
                  "summary": (proc.stderr if job == "language" else proc.stdout).strip().splitlines()[-14:]}
        if job == "vision":
            record["materialise_s"] = round(materialise_s, 1)
        print(json.dumps(record, indent=1), flush=True)
        if args.out:
            with open(Path(args.out) / "default_jobs_cpu.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

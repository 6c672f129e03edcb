"""Search throughput on the tiny setup: trials per hour with one worker and with two worker processes
sharing one study (the shipped tiny Mamba, the engine's toy task, a few steps per trial).

    PYTHONPATH=$PWD/src python bench/bench_search.py [--trials 12] [--storage URL] [--out bench/results/search.json]

Each configuration runs `mambapeft search --step 1` worker processes on a fresh study; trials/hour
counts finished trials over the time from the first trial's start to the last one's end (the time
a long search spends), and over the whole wall time including process start. Each worker uses
--threads torch threads (default 1, so the ratio measures worker processes). The two-worker
figure is also given as a ratio to the one-worker run of the same invocation."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from mambapeft.cli import DEFAULT_MODEL  # noqa: E402
from mambapeft.search.study import with_driver  # noqa: E402


def run(workers, trials, storage, tmp, steps, threads):
    study = f"bench-{workers}w-{uuid.uuid4().hex[:6]}"
    cfg = {"model": DEFAULT_MODEL, "task": {"type": "toy", "train": 400, "validation": 64, "test": 64},
           "training": {"max_steps": steps, "eval_every": steps // 2, "batch_size": 16, "lr": 0.005},
           "output_dir": str(tmp / study),
           "search": {"trials": trials, "storage": storage, "study": study, "pruner": "none",
                      "threads": threads, "heartbeat_interval": 10}}
    path = tmp / f"{study}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "mambapeft.cli", "search", str(path), "--step", "1", "--no-test"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(workers)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed:\n{err[-2000:]}")
    wall = time.time() - start
    s = optuna.load_study(study_name=f"{study}.step1", storage=with_driver(storage))
    done = [t for t in s.trials if t.state.is_finished() and t.state.name in ("COMPLETE", "PRUNED")]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    per_trial = sorted((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    return {"workers": workers, "threads_per_worker": threads, "finished": len(done),
            "trials": len(s.trials), "span_s": round(span, 2), "wall_s": round(wall, 2),
            "trials_per_hour": round(3600 * len(done) / span, 1),
            "trials_per_hour_wall": round(3600 * len(done) / wall, 1),
            "median_trial_s": round(per_trial[len(per_trial) // 2], 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per trial")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (1: the comparison measures processes, not threads)")
    p.add_argument("--storage", help="database URL (default: a SQLite file in a temporary directory)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        storage = args.storage or f"sqlite:///{tmp / 'bench.db'}"
        rows = [run(w, args.trials, storage, tmp, args.steps, args.threads) for w in (1, 2)]
    rows[1]["ratio_to_one_worker"] = round(rows[1]["trials_per_hour"] / rows[0]["trials_per_hour"], 2)
    result = {"command": "PYTHONPATH=$PWD/src python bench/bench_search.py " + " ".join(sys.argv[1:]),
              "storage": "sqlite (temporary file)" if not args.storage else args.storage.split("://")[0],
              "cpu_count": os.cpu_count(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
              "setup": f"tiny Mamba (shipped), toy task, {args.steps} steps x 16 items per trial, "
                       "validation every half, no pruning", "runs": rows}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

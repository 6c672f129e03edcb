#!/usr/bin/env bash
# The default's GPU run (issue 12), one H200, about 9 minutes: the two built-in jobs as shipped (on
# the GPU, to check their before -> after), then the method table on both shipped suites.
# Run from the repository root with .gpu/ (kernel wheels) and .whl/gsite.tar.gz (lm-eval, optuna and
# their pure-Python needs, which the GPU image lacks) carried. Results under $OUT.
set -u
OUT=${OUT:-bench/results/default_gpu}
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-deps --no-index --target /tmp/site .gpu/*.whl
tar xzf .whl/gsite.tar.gz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 MAMBAPEFT_CACHE=/tmp/cache
COMMIT=${COMMIT:-unknown}
python3 -c "from mambapeft.default.shipped import vision_suite_dir; print(vision_suite_dir('/tmp/vision'))"

# 1. the built-in jobs, as the README runs them, on the GPU (their CPU times are measured separately)
(python3 -m mambapeft.cli train examples/default_language.yaml training.device=cuda output_dir=/tmp/jobs/language \
    > "$OUT/job_language.txt" 2>&1; cp /tmp/jobs/language/metrics.json "$OUT/job_language_metrics.json") &
(python3 -m mambapeft.cli vtab examples/default_vision.yaml training.device=cuda output_dir=/tmp/jobs/vision \
    > "$OUT/job_vision.txt" 2>&1; cp /tmp/jobs/vision/summary.md "$OUT/job_vision_summary.md") &

# 2. the method table (rows that finish by the time limit; a rerun adds the missing ones)
python3 bench/method_table.py --lm src/mambapeft/assets/mamba-default --vim src/mambapeft/assets/vim-default \
    --language-suite src/mambapeft/assets/suites/language --vision-suite /tmp/vision \
    --workers ${WORKERS:-12} --time-limit ${LIMIT:-420} --commit "$COMMIT" \
    --out "$OUT" --docs "$OUT/method_table.md" --work /tmp/method_table 2>&1 | grep -v "^\s*$" | tail -60
wait
tail -n 5 "$OUT/job_language.txt" "$OUT/job_vision.txt"

#!/usr/bin/env bash
# Issue 13 on one H200 (about 6 minutes): the GPU tests of the fused route, then the benchmark
# rounds at the mamba-130m and mamba-1.4b shapes. Run from the repository root, with the kernel
# wheels carried in .gpu/ (see /work/shared/gpu/README.md). Results go to $OUT (default
# bench/results/issue13): gpu_tests.txt, gpu_bench.{jsonl,txt}, gpu_profile.txt and their _1.4b twins.
set -u
OUT=${OUT:-bench/results/issue13}
mkdir -p "$OUT"
if ls .gpu/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --target /tmp/site .gpu/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# 1. GPU tests (about 1 minute). gpu_tests KEYWORD LINES WHAT: run the GPU tests matching KEYWORD, show the
#    log's last LINES lines and print PASS or FAIL for WHAT; returns pytest's exit status.
gpu_tests() {
    python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_frozen.py -k "$1" -p no:warnings >> "$OUT/gpu_tests.txt" 2>&1
    local status=$?
    tail -"$2" "$OUT/gpu_tests.txt"
    echo "$([ $status -eq 0 ] && echo PASS || echo FAIL): $3 (pytest exit $status)"
    return $status
}
: > "$OUT/gpu_tests.txt"
if ! gpu_tests "our_inner" 25 "our inner function equals mamba_inner_fn and the reference on the GPU"; then
    echo "FALLBACK: the benchmark runs on mamba_ssm's mamba_inner_fn (MAMBAPEFT_INNER=mamba_ssm)" \
        | tee -a "$OUT/gpu_tests.txt"
    export MAMBAPEFT_INNER=mamba_ssm
fi
# affix tokens as a Triton prefill (opt-in: MAMBAPEFT_AFFIX_SCAN=triton) against extra positions and the reference
gpu_tests "affix_prefill" 8 "the affix prefill equals extra positions and the reference on the GPU"
gpu_tests "not our_inner and not affix_prefill" 15 "every method on the fused route against the reference, and bf16 frozen weights"

# 2. mamba-130m shape, 8x1024 (about 2.5 minutes): ours vs transformers + peft, our inner function vs
#    mamba_inner_fn, eager vs one CUDA graph per step, and the profile with the GPU busy fraction.
python3 bench/bench_gpu.py --out "$OUT" --only train,hf_lora --rounds 2 --steps 8 \
    --runs lora_X_r64,lora_X_r64_frozen_bf16,lora_X_r64_mamba_inner,affix_3,affix_3_triton_scan,additional_scan_6,lora_in_proj_r8 \
    --interleave hf_lora_in_proj_r8,hf_lora_in_proj_r8_bf16_base,lora_X_r64,lora_X_r64_frozen_bf16,lora_X_r64_mamba_inner,affix_3,affix_3_triton_scan,additional_scan_6 \
    --graphs lora_X_r64,affix_3,additional_scan_6 --profile lora_X_r64,lora_X_r64_frozen_bf16,hf_lora 2>&1 \
    | grep -v '^{' | tail -55

# 3. mamba-1.4b shape, 4x2048 (about 1.5 minutes).
python3 bench/bench_gpu.py --out "$OUT" --shape 1.4b --only train,hf_lora --steps 5 --warmup 2 \
    --runs lora_X_r64,lora_X_r64_frozen_bf16,lora_X_r64_mamba_inner,affix_3,additional_scan_6 \
    --graphs lora_X_r64 --profile lora_X_r64,lora_X_r64_frozen_bf16 2>&1 | grep -v '^{' | tail -36

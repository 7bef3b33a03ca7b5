#!/usr/bin/env bash
# One call that measures kat_timm on a GPU (README, "Benchmarks"): the CUDA tests, the kernel report, the op benchmark
# and host overhead, the model benchmark eager and compiled. Markdown and JSON go to OUTDIR, a summary is printed
# last; each step has its own time limit (about 8 minutes in all) and a failed step does not stop the others.
# Needs python3 with torch, triton, timm and pytest; no network, no pip.
#
#   scripts/gpu_check.sh OUTDIR             # on a machine with a CUDA GPU
#   scripts/gpu_check.sh --dry-run OUTDIR   # the same steps in their quick CPU forms (what CI runs)
set -uo pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
[ $# -eq 1 ] || { echo "usage: $0 [--dry-run] OUTDIR" >&2; exit 2; }
out=$1
mkdir -p "$out" || { echo "gpu_check: can't create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if [ $dry_run -eq 0 ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $py (use --dry-run for the CPU smoke run)" >&2
    exit 2
fi

summary="$out/summary.md"
: > "$summary"
failures=0

# step NAME LIMIT_S OUTFILE COMMAND...: run with a time limit, output to OUTFILE, status into the summary.
step() {
    local name=$1 limit=$2 file=$3 start=$SECONDS rc
    shift 3
    timeout "$limit" "$@" > "$out/$file" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "- $name: ok ($((SECONDS - start)) s, $file)" >> "$summary"
    else
        failures=$((failures + 1))
        [ $rc -eq 124 ] && rc="timed out after ${limit} s"
        echo "- $name: FAILED ($rc, $((SECONDS - start)) s, $file)" >> "$summary"
    fi
}

# The two forms differ in device, sizes and time limits only: the same steps with the same flags otherwise.
if [ $dry_run -eq 1 ]; then
    dev=(--quick --device cpu --threads 1) kernels=(--batch 1 --dtype bfloat16) ops=(--shapes 192)
    models=(--sizes tiny) limits=(300 300 300 300 300) eager="model benchmark"
else
    "$py" -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', \
timm.__version__, torch.cuda.get_device_name())" > "$out/versions.txt" 2>&1
    dev=(--device cuda) kernels=(--batch 128) ops=(--batch 128 --dtype bfloat16 float32) models=(--batch 128 --reps 5)
    limits=(100 50 90 30 90) eager="model benchmark, eager"
fi
step "pytest -m cuda" "${limits[0]}" pytest_cuda.txt "$py" -m pytest -q -p no:cacheprovider -m cuda \
    tests/ops/test_cuda.py
step "kernel report" "${limits[1]}" kernel_report.md "$py" scripts/kernel_report.py --arch sm_90a "${kernels[@]}" \
    --json "$out/kernel_report.json"
step "op benchmark" "${limits[2]}" benchmark_ops.md "$py" scripts/benchmark_ops.py "${dev[@]}" "${ops[@]}" \
    --providers gelu ours --json "$out/benchmark_ops.json"
step "op host overhead" "${limits[3]}" overhead.md "$py" scripts/benchmark_ops.py --overhead "${dev[@]}" \
    --json "$out/overhead.json"
step "$eager" "${limits[4]}" benchmark_models.md "$py" scripts/benchmark_models.py "${dev[@]}" "${models[@]}" \
    --json "$out/benchmark_models.json"
if [ $dry_run -eq 0 ]; then
    step "model benchmark, compiled" 120 benchmark_models_compiled.md "$py" scripts/benchmark_models.py "${dev[@]}" \
        "${models[@]}" --compile --json "$out/benchmark_models_compiled.json"
fi

{
    echo
    echo "## gpu_check summary ($(date -u +%Y-%m-%dT%H:%MZ), $([ $dry_run -eq 1 ] && echo 'dry run, CPU' || cat "$out/versions.txt"))"
    echo
    cat "$summary"
    echo
    tail -n 3 "$out/pytest_cuda.txt" 2>/dev/null | sed 's/^/    pytest: /'
    grep -h -E "target|PASS|FAIL" "$out"/benchmark_*.md "$out/overhead.md" 2>/dev/null | sed 's/^/    /'
} > "$out/summary_full.md"
mv "$out/summary_full.md" "$summary"
cat "$summary"
[ $failures -eq 0 ]

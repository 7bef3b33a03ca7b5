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

if [ $dry_run -eq 1 ]; then
    cpu=(--quick --device cpu --threads 1)
    step "pytest -m cuda" 300 pytest_cuda.txt "$py" -m pytest -q -p no:cacheprovider -m cuda tests/ops/test_cuda.py
    step "kernel report" 300 kernel_report.md "$py" scripts/kernel_report.py --arch sm_90a --batch 1 \
        --dtype bfloat16 --json "$out/kernel_report.json"
    step "op benchmark" 300 benchmark_ops.md "$py" scripts/benchmark_ops.py "${cpu[@]}" --shapes 192 \
        --providers gelu ours --json "$out/benchmark_ops.json"
    step "op host overhead" 300 overhead.md "$py" scripts/benchmark_ops.py --overhead "${cpu[@]}" \
        --json "$out/overhead.json"
    step "model benchmark" 300 benchmark_models.md "$py" scripts/benchmark_models.py "${cpu[@]}" --sizes tiny \
        --json "$out/benchmark_models.json"
else
    "$py" -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', \
timm.__version__, torch.cuda.get_device_name())" > "$out/versions.txt" 2>&1
    step "pytest -m cuda" 100 pytest_cuda.txt "$py" -m pytest -q -p no:cacheprovider -m cuda tests/ops/test_cuda.py
    step "kernel report" 50 kernel_report.md "$py" scripts/kernel_report.py --arch sm_90a --batch 128 \
        --json "$out/kernel_report.json"
    step "op benchmark" 90 benchmark_ops.md "$py" scripts/benchmark_ops.py --device cuda --batch 128 \
        --dtype bfloat16 float32 --providers gelu ours --json "$out/benchmark_ops.json"
    step "op host overhead" 30 overhead.md "$py" scripts/benchmark_ops.py --overhead --device cuda \
        --json "$out/overhead.json"
    step "model benchmark, eager" 90 benchmark_models.md "$py" scripts/benchmark_models.py --device cuda \
        --batch 128 --reps 5 --json "$out/benchmark_models.json"
    step "model benchmark, compiled" 120 benchmark_models_compiled.md "$py" scripts/benchmark_models.py \
        --device cuda --batch 128 --reps 5 --compile --json "$out/benchmark_models_compiled.json"
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

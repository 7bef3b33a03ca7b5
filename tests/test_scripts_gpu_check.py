"""scripts/gpu_check.sh, the one-call GPU measurement, in its CPU dry run: every step runs and writes its files, so
the script and the flags it passes to the benchmarks can't rot between the rare runs on a GPU."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["pytest -m cuda", "kernel report", "op benchmark", "op host overhead", "model benchmark"]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert result.stdout.strip().endswith(summary.strip().splitlines()[-1].strip())
    for name in STEPS:
        assert f"- {name}: ok" in summary, summary
    for name in ("kernel_report.json", "benchmark_ops.json", "overhead.json", "benchmark_models.json"):
        assert (out / name).stat().st_size > 0, name
    assert "| sm_90a |" in (out / "kernel_report.md").read_text()


def test_gpu_check_without_gpu_refuses(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "x")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device" in result.stderr, result.stderr
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr

"""Runs the Triton kernel checks under Triton's interpreter (TRITON_INTERPRET=1) in a fresh process."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_triton_kernels_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", KAT_RATIONAL_BACKEND="triton")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops/interpreted_triton_checks.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    summary = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, summary
    assert " passed" in result.stdout and "skipped" not in result.stdout, summary

"""Smoke test of scripts/benchmark_ops.py: a --quick CPU run prints the table with a row per provider."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_ops.py"


def test_benchmark_quick_cpu(tmp_path):
    out_json = tmp_path / "results.json"
    # One thread: the test machine may be busy, and OpenMP barriers under contention make a multi-threaded run slow.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--shapes", "192", "768",
         "--json", str(out_json)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "| shape | dtype | provider | fwd ms | bwd ms | fwd+bwd ms |" in result.stdout
    for width in (192, 768):
        rows = [line for line in lines if line.startswith(f"| 1x197x{width} | float32 |")]
        labels = [row.split("|")[3].strip() for row in rows]
        assert labels[0] == "gelu" and labels[1].startswith("ours (") and labels[2].startswith("ours+bias ("), labels
        assert labels[3] == "ours (torch)" and labels[4] == "formula (eager)" and len(labels) == 5, labels
        assert not any("failed" in row for row in rows), rows
    assert "CPU targets" in result.stdout
    data = json.loads(out_json.read_text())
    assert len(data["results"]) == 10 and all("ms" in r for r in data["results"])


def test_benchmark_json_into_a_missing_folder_is_refused_before_measuring(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--json",
                             str(tmp_path / "none" / "x.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"--json {tmp_path / 'none' / 'x.json'}: the folder {tmp_path / 'none'} does not exist" in result.stderr
    assert "| shape |" not in result.stdout, "nothing is measured first"

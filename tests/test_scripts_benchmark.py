"""Smoke test of scripts/benchmark_ops.py: a --quick CPU run prints the table with a row per provider, each case as
soon as it is measured; and the --json check of the benchmark and kernel-report scripts, before any measurement."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# (script, arguments that would measure or compile for a while if the --json check came late)
JSON_SCRIPTS = [("benchmark_ops.py", ["--quick", "--device", "cpu"]),
                ("benchmark_models.py", ["--quick", "--device", "cpu"]),
                ("kernel_report.py", ["--arch", "sm_90a", "--batch", "1"])]


@pytest.mark.parametrize("script,arguments", JSON_SCRIPTS, ids=[s for s, _ in JSON_SCRIPTS])
def test_json_that_cannot_be_written_is_refused_before_measuring(tmp_path, script, arguments):
    cases = [(tmp_path, "is a folder; give a file path such as " + str(tmp_path / "results.json")),
             (Path("/sys/kat_timm_benchmark.json"), "can't be written (Permission denied)")]  # read-only even for root
    for path, message in cases:
        result = subprocess.run([sys.executable, str(SCRIPTS / script), *arguments, "--json", str(path)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"--json {path}: {message}" in result.stderr.strip().splitlines()[-1], result.stderr
        assert result.stdout == "", "nothing is measured or compiled first"
    assert list(tmp_path.iterdir()) == []


def test_each_case_is_printed_and_in_the_json_as_soon_as_it_is_measured(tmp_path):
    out_json = tmp_path / "results.json"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--shapes", "192", "768",
         "--providers", "gelu", "ours", "--json", str(out_json)], stdout=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:  # the first case's rows, while the second case is still to be measured
            if line.startswith("| 1x197x192 | float32 | ours"):
                break
        data = json.loads(out_json.read_text())
        assert data["complete"] is False and [r["provider"] for r in data["results"]] == ["gelu", "ours"], data
        assert all(r["shape"] == [1, 197, 192] and "ms" in r for r in data["results"])
    finally:
        process.kill()
        process.wait()

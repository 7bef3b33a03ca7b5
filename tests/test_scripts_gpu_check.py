"""scripts/gpu_check.sh, the one prepared call for a lent GPU, in its CPU dry run: every step runs (or is reported
"not run" when the budget can't hold it) and writes at most six files, so the call can't rot between the rare runs on
a GPU; and its command line, checked before anything is made or measured."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FILES = {"summary.md", "results.json", "ops.md", "models.md", "pytest_cuda.txt", "log.txt"}
STEPS = ["op bf16, KAT-T/S/B shapes", "models, eager, training", "pytest -m cuda", "op fp32, KAT-T/S/B shapes",
         "models, eager, inference", "host overhead per call"]


def gpu_check(*args, cwd=ROOT, timeout=600, **env):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHON=sys.executable, **env))


def summary_rows(summary: str) -> list:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| check |")]


def test_dry_run_runs_every_step_and_reports_the_compile_it_cannot_afford(tmp_path):
    out = tmp_path / "gpu"
    # A budget with room for a busy CI machine (about 60 s of CPU time, minutes of wall time under load), still below
    # the estimate of a CPU compile (600 s): steps 1-5 run, step 6 is reported not run.
    result = gpu_check("--dry-run", "--budget", "590", out, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES  # the device returns at most 8 files
    summary = (out / "summary.md").read_text()
    assert result.stdout.strip().endswith(summary.strip().splitlines()[-1].strip())
    assert summary.startswith("# gpu_check: CPU: ") and "DRY RUN" in summary
    assert "git commit: " in summary and "copy bandwidth" in summary and "torch " in summary
    for step in STEPS:
        assert f"- {step}: ok (" in summary, summary
    rows = summary_rows(summary)
    checks = {row[0] for row in rows}
    assert {"timm version", "copy bandwidth", "op vs float64 reference", "op bfloat16 fwd", "op bfloat16 bwd",
            "models eager", "pytest -m cuda", "op float32 fwd", "host overhead per call"} <= checks, checks
    assert all(len(row) == 5 for row in rows), rows
    op_checks = [row for row in rows if row[0] == "op vs float64 reference"]
    assert [row[4] for row in op_checks] == ["PASS", "PASS"], op_checks
    assert {row[1].split(",")[0] for row in rows if row[0] == "models eager"} == {"tiny train", "tiny infer"}
    # A CPU compile takes minutes: the budget check skips it and the table says so.
    compiled = [row for row in rows if row[0].startswith("models, torch.compile")]
    assert [row[0] for row in compiled] == ["models, torch.compile, tiny train", "models, torch.compile, tiny infer"]
    assert all(row[4].startswith("not run: needs ~") for row in compiled), compiled

    data = json.loads((out / "results.json").read_text())
    assert {"ops_bf16", "models_train", "pytest_cuda", "ops_fp32", "models_infer", "overhead"} <= set(data["results"])
    assert data["results"]["ops_bf16"]["complete"] and data["results"]["models_train"]["complete"]
    assert data["meta"]["commit"] and data["meta"]["copy_gbps"] > 0
    assert "skipped" in data["results"]["pytest_cuda"]["tally"] and not data["results"]["pytest_cuda"]["failed"]
    assert "| 1x197x192 | bfloat16 | ours (" in (out / "ops.md").read_text()
    assert "| tiny | train |" in (out / "models.md").read_text()


def test_a_budget_that_holds_only_the_preamble_reports_every_step_not_run(tmp_path):
    out = tmp_path / "gpu"
    result = gpu_check("--dry-run", "--budget", "1", out)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = summary_rows((out / "summary.md").read_text())
    skipped = {row[0]: row[4] for row in rows if row[4].startswith("not run")}
    assert set(skipped) == set(STEPS) | {"models, torch.compile, tiny train", "models, torch.compile, tiny infer"}
    assert all("of the budget left" in verdict for verdict in skipped.values()), skipped
    assert [row[4] for row in rows if row[0] == "op vs float64 reference"] == ["PASS", "PASS"]
    assert {p.name for p in out.iterdir()} <= FILES


def test_help_is_help_not_an_output_folder(tmp_path):
    for flag in ("--help", "-h"):
        result = gpu_check(flag, cwd=tmp_path, timeout=120)
        assert result.returncode == 0 and result.stdout.startswith("usage: "), result.stdout + result.stderr
        assert "--budget SECONDS" in result.stdout and "--dry-run" in result.stdout
    assert list(tmp_path.iterdir()) == [], "no folder named after the flag"


def test_without_torch_one_line_and_no_folder(tmp_path):
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('No module named torch (test stand-in)')\n")
    result = gpu_check(tmp_path / "out", PYTHONPATH=str(fake), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("gpu_check: ") and "can't import torch" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_without_gpu_refuses(tmp_path):
    result = gpu_check(tmp_path / "x", timeout=120, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2 and "no CUDA device" in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()
    result = gpu_check(timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_old_timm_skips_the_model_steps_and_says_what_to_carry():
    gpu = load_gpu_check()
    floor = gpu.timm_floor()
    assert f'"timm>={floor}"' in (ROOT / "pyproject.toml").read_text()
    assert gpu.version_tuple("1.0.20") < gpu.version_tuple(floor) and gpu.version_tuple("1.0.31+cu") == (1, 0, 31)
    steps = {step["name"]: step.get("skip") for step in gpu.plan(dry_run=False, timm_ok=False)}
    assert all(skip for name, skip in steps.items() if name.startswith("models")), steps
    assert not any(skip for name, skip in steps.items() if not name.startswith("models")), steps
    assert [name for name in steps if "compile" in name][:2] == ["models, torch.compile, tiny train",
                                                                 "models, torch.compile, tiny infer"]
    text = gpu.carry_instructions(floor)
    assert f"timm {floor}" in text and "scripts/device_wheels.sh" in text and 'carry [".whl"]' in text
    assert "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site" in text
    assert (ROOT / "scripts" / "device_wheels.sh").exists() and "/.whl/" in (ROOT / ".gitignore").read_text()

"""Smoke test of scripts/benchmark_models.py: a --quick CPU run prints the KAT-vs-ViT table and writes the JSON."""
import json
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_models.py"


def test_benchmark_models_quick_cpu(tmp_path):
    out_json = tmp_path / "results.json"
    started = time.perf_counter()
    # One thread: the test machine may be busy, and OpenMP barriers under contention make a multi-threaded run slow.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--json", str(out_json)],
        capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 60, f"--quick took {elapsed:.0f} s"

    lines = result.stdout.splitlines()
    assert "| size | mode | ViT img/s | KAT img/s | KAT/ViT time | KAT/ViT throughput |" in result.stdout
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in lines if line.startswith("| tiny |")}
    assert set(rows) == {("tiny", "infer"), ("tiny", "train")}, rows
    for line in rows.values():
        assert "failed" not in line, line
        vit_ips, kat_ips, time_ratio, throughput_ratio = (float(c) for c in line.split("|")[3:7])
        assert vit_ips > 0 and kat_ips > 0 and time_ratio > 0 and throughput_ratio > 0, line
    assert "- construction (timm.create_model on CPU, fresh init): vit_tiny_patch16_224" in result.stdout
    assert "- CPU target, tiny inference: KAT/ViT time" in result.stdout
    assert "- CPU target, tiny training step: KAT/ViT time" in result.stdout
    assert "- CPU target, small inference: not evaluated (needs --sizes small --modes infer)" in result.stdout

    data = json.loads(out_json.read_text())
    assert data["meta"]["quick"] and data["meta"]["batch"] == 2 and data["meta"]["threads"] == 1
    assert [(r["size"], r["mode"]) for r in data["results"]] == [("tiny", "infer"), ("tiny", "train")]
    for row in data["results"]:
        assert "error" not in row, row
        assert len(row["samples_ms"]["vit"]) == len(row["samples_ms"]["kat"]) == data["meta"]["reps"]
        assert row["time_ratio"] > 0 and row["images_per_s"]["kat"] > 0
    assert {c["model"] for c in data["construction"]} == {"vit_tiny_patch16_224", "kat_tiny_patch16_224"}
    assert all(c["seconds"] > 0 for c in data["construction"])


def test_activation_bound_times_a_vit_without_its_activation(tmp_path):
    out_json = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--modes", "infer",
         "--activation-bound", "--json", str(out_json)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| ViT ms | KAT ms | no-act ViT/ViT time |" in result.stdout
    assert "vit_tiny_patch16_224 (no activation)" in result.stdout
    (row,) = json.loads(out_json.read_text())["results"]
    assert set(row["samples_ms"]) == {"vit", "kat", "vit_noact"}
    assert len(row["samples_ms"]["vit_noact"]) == len(row["samples_ms"]["vit"])
    assert row["bound_time_ratio"] > 0


def test_each_row_is_printed_and_in_the_json_as_soon_as_it_is_measured(tmp_path):
    out_json = tmp_path / "results.json"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1", "--img-size", "32",
         "--json", str(out_json)], stdout=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:  # the infer row, while the train row is still to be measured
            if line.startswith("| tiny | infer |"):
                break
        data = json.loads(out_json.read_text())
        assert data["complete"] is False and [(r["size"], r["mode"]) for r in data["results"]] == [("tiny", "infer")]
        assert {c["model"] for c in data["construction"]} == {"vit_tiny_patch16_224", "kat_tiny_patch16_224"}
    finally:
        process.kill()
        process.wait()


def test_deployment_paths_refuse_what_they_cannot_measure():
    """--path onnxruntime / aoti are CPU inference only; --compile is --path compile: one-line usage errors."""
    for args, message in ((["--path", "aoti", "--modes", "train"], "--path aoti is for inference: use --modes infer"),
                          (["--path", "onnxruntime", "--compile"],
                           "--compile is --path compile; it can't be combined with --path onnxruntime")):
        result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_openvino_path_without_openvino_says_how_to_install_it():
    """--path openvino where OpenVINO is not installed (simulated: the import is blocked): a one-line usage error."""
    code = ("import runpy, sys; sys.modules['openvino'] = None; "
            f"sys.argv = [{str(SCRIPT)!r}, '--device', 'cpu', '--path', 'openvino']; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "--path openvino needs OpenVINO, which is not installed: pip install openvino" in result.stderr
    assert "Traceback" not in result.stderr

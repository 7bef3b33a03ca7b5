"""A forced ``KAT_RATIONAL_BACKEND`` that can't run where a command runs its model is one line, before any model is
built or file written (issue 21, item 7): ``triton`` with the model on the CPU, ``native`` without a C compiler."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kat_timm.factory
from kat_timm.cli import demo, export, predict, train, validate
from tests.helpers import one_thread_env
from tests.training.test_data import make_image_folder

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "kat_timm" / "assets" / "grace_hopper.jpg"


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if a command gets as far as building a model (the check must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the backend was checked")

    monkeypatch.setattr(kat_timm.factory, "create_model", refuse)


@pytest.mark.parametrize("command", ["predict", "validate", "demo", "export", "train"])
def test_triton_forced_with_the_model_on_the_cpu_is_one_line_before_anything_is_built(
        command, tmp_path, capsys, monkeypatch, no_model_built):
    monkeypatch.setenv("KAT_RATIONAL_BACKEND", "triton")
    data = make_image_folder(tmp_path / "data", splits=(("train", 2), ("validation", 2))) if command in (
        "validate", "train") else None
    argv = {
        "predict": (predict, ["--random-weights", "--device", "cpu", str(IMAGE)]),
        "validate": (validate, ["--model", "kat_tiny", "--img-size", "32", "--device", "cpu", str(data)]),
        "demo": (demo, ["--offline", "--device", "cpu"]),
        "export": (export, ["kat_tiny", "--img-size", "32", "-o", str(tmp_path / "m.onnx")]),
        "train": (train, ["--data-dir", str(data), "--model", "kat_tiny", "--img-size", "32", "--device", "cpu",
                          "--output", str(tmp_path / "out"), "--experiment", "run"]),
    }
    module, args = argv[command]
    assert module.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "KAT_RATIONAL_BACKEND=triton" in err and "runs on the cpu" in err and "unset KAT_RATIONAL_BACKEND" in err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "out").exists(), "nothing may be written"


def test_native_forced_without_a_compiler_stops_kat_train_before_its_run_folder(tmp_path):
    # A process of its own: whether the kernel can be built is decided once per process.
    data = make_image_folder(tmp_path / "data", splits=(("train", 2), ("validation", 2)))
    env = one_thread_env(KAT_RATIONAL_BACKEND="native", CC="kat-timm-no-such-compiler",
                         KAT_TIMM_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "kat_timm.cli.train", "--data-dir", str(data), "--model", "kat_tiny", "--img-size",
         "32", "--device", "cpu", "--output", str(tmp_path / "out"), "--experiment", "run"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "kat-train: error: KAT_RATIONAL_BACKEND=native: the native CPU kernel is not available: no C compiler found "
        "(looked for `kat-timm-no-such-compiler`; set CC or install gcc); unset KAT_RATIONAL_BACKEND (auto picks what "
        "runs here) or set it to torch")
    assert not (tmp_path / "out").exists(), "no run folder (args.yaml) for a run that can't start"

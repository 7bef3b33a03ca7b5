"""scripts/vit_conversion_error.py: the README's ViT -> KAT conversion measurement runs and prints its table."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "scripts/vit_conversion_error.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_prints_one_row_per_scale():
    result = run("--img-size", "32", "--batch", "2", "--scales", "1", "8", "--inits", "gelu", "gelu_wide")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# ") and "vit_tiny_patch16_224 at 32 px, batch 2, seed 0" in lines[0]
    assert lines[1] == ("| K | fc1 out std | fc1 out max abs | gelu: max abs diff (relative) | "
                        "gelu_wide: max abs diff (relative) |")
    number = r"\d\.\d\de[-+]\d\d \(\d\.\de[-+]\d\d\)"
    rows = [line for line in lines if line.startswith("| 1 |") or line.startswith("| 8 |")]
    assert len(rows) == 2 and all(re.fullmatch(rf"\| \d+ \| [\d.]+ \| [\d.]+ \| {number} \| {number} \|", r) for r in rows)


def test_bad_input_is_one_line():
    result = run("--inits", "gleu")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == ("vit_conversion_error.py: error: --inits: unknown gleu; the table has "
                                              "identity, swish, tanh, sigmoid, gelu, gelu_wide, relu, leaky_relu")

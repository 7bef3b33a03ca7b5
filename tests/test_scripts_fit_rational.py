"""scripts/fit_rational.py: the table is data; only built-in targets and the command line's --expr are evaluated."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from kat_timm.layers import RATIONAL_INITS_PATH
from kat_timm.ops import group_rational_reference

ROOT = Path(__file__).resolve().parents[1]


def fit(*args):
    return subprocess.run([sys.executable, "scripts/fit_rational.py", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def values(entry, x):
    return group_rational_reference(x, torch.tensor([entry["numerator"]], dtype=torch.float64),
                                    torch.tensor([entry["denominator"]], dtype=torch.float64))


def test_expressions_stored_in_the_table_are_never_evaluated(tmp_path):
    marker = tmp_path / "code_ran"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch() or x"
    table = json.loads(RATIONAL_INITS_PATH.read_text())
    table["evil"] = dict(table["swish"], expression=payload)
    table["gelu"] = dict(table["gelu"], expression=payload)  # a built-in's stored expression is not read either
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table, indent=2) + "\n")
    before = path.read_text()

    named = fit("evil", "--output", path)
    assert named.returncode == 2 and named.stderr == (
        "error: 'evil' is not a built-in entry and the expression stored in the table is never evaluated; "
        "refit it with --name evil --expr EXPRESSION\n"
    )
    assert not marker.exists(), "the table's expression ran"
    assert path.read_text() == before, "nothing is written on failure"

    every = fit("--output", path)  # the default: every built-in entry
    assert every.returncode == 0, every.stderr
    assert not marker.exists(), "the table's expression ran"
    assert "kept as stored (not built in; refit one with --name NAME --expr EXPRESSION): evil" in every.stdout
    refitted = json.loads(path.read_text())
    assert refitted["evil"] == table["evil"], "an entry that is not built in is kept as stored data"
    assert refitted["gelu"]["expression"] == "x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))"


def test_refit_reproduces_the_shipped_table(tmp_path):
    """A refit rewrites the table in its own format: entries not refitted come back byte for byte, and the refitted
    ones compute the shipped functions (to float noise: BLAS builds differ in the last bits)."""
    shipped_text = RATIONAL_INITS_PATH.read_text()
    shipped = json.loads(shipped_text)
    path = tmp_path / "table.json"
    path.write_text(shipped_text)
    result = fit("identity", "gelu", "--output", path)
    assert result.returncode == 0, result.stderr
    refitted = json.loads(path.read_text())
    assert list(refitted) == list(shipped)
    assert json.dumps({**refitted, "gelu": shipped["gelu"]}, indent=2) + "\n" == shipped_text
    x = torch.linspace(-3, 3, 20001, dtype=torch.float64).view(-1, 1)
    assert (values(refitted["gelu"], x) - values(shipped["gelu"], x)).abs().max().item() < 1e-9
    assert refitted["gelu"]["fit_range"] == shipped["gelu"]["fit_range"]

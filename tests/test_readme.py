"""README.md's Python: every ``kat_timm.X`` path it names resolves after a bare ``import kat_timm``, and every
snippet that needs neither the network nor a file of the reader's runs as written.

Run in a fresh interpreter: an attribute that only exists because another test imported its module first (the bug
of ``kat_timm.tools.export.export_program`` after ``import kat_timm``) must fail here.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")

# A dotted name after "-m" is a module to run (python -m kat_timm.run); anywhere else it is an attribute path.
DOTTED = re.compile(r"(-m\s+)?\b(kat_timm(?:\.[A-Za-z_]\w*)+)")
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
# What a snippet needs that a test machine lacks: released weights, the Hub, or the reader's own files.
NEEDS_OUTSIDE = re.compile(r"pretrained=True|from_pretrained|pipeline\(|\.jpg|\.onnx|my/folder")

RESOLVE = """
import importlib, importlib.util, json, sys
import kat_timm
failed = []
for path, is_module in json.loads(sys.argv[1]):
    if is_module:
        if importlib.util.find_spec(path) is None:
            failed.append(path + " (python -m: no such module)")
        continue
    value = kat_timm
    for part in path.split(".")[1:]:
        try:
            value = getattr(value, part)
        except AttributeError as error:
            failed.append(f"{path}: {error}")
            break
print(json.dumps(failed))
"""


def _fresh_python(code: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_every_kat_timm_path_in_readme_resolves_after_import():
    paths = sorted({(match.group(2).rstrip("."), bool(match.group(1))) for match in DOTTED.finditer(TEXT)})
    names = {path for path, _ in paths}
    # The README names the tools' Python API at the top level; the regression of item 6 is these failing.
    assert {"kat_timm.download_pretrained", "kat_timm.export_program", "kat_timm.export_onnx"} <= names
    failed = json.loads(_fresh_python(RESOLVE, json.dumps(paths)).strip().splitlines()[-1])
    assert not failed, "README names kat_timm paths that do not resolve after `import kat_timm`: " + "; ".join(failed)


def test_readme_from_imports_resolve():
    imports = sorted(set(re.findall(r"from (kat_timm[\w.]*) import (\w+)", TEXT)))
    assert imports, "README.md has no `from kat_timm... import` line: the pattern is stale"
    code = "\n".join(f"from {module} import {name}" for module, name in imports)
    _fresh_python(code)


OFFLINE_BLOCKS = [block for block in PYTHON_BLOCKS if not NEEDS_OUTSIDE.search(block)]


def test_readme_has_offline_snippets():
    assert len(OFFLINE_BLOCKS) >= 2, "the op and layer snippets of README.md should run offline"


@pytest.mark.parametrize("block", OFFLINE_BLOCKS, ids=[b.splitlines()[0][:40] for b in OFFLINE_BLOCKS])
def test_readme_offline_snippet_runs(block):
    _fresh_python("import torch; torch.set_num_threads(1)\n" + block)


def _shell_commands(prefixes):
    """The command lines of README.md's fenced shell blocks that start with one of ``prefixes`` (continuation lines
    joined, comments dropped), as argument lists."""
    import shlex

    commands = []
    for block in re.findall(r"```(?:bash|console)\n(.*?)```", TEXT, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.lstrip("$ "), comments=True)
            if words and words[0] in prefixes:
                commands.append(words)
    return commands


class _Parsed(Exception):
    pass


CLI_COMMANDS = _shell_commands({"kat-timm", "kat-validate"})


def test_readme_shows_cli_commands():
    shown = {" ".join(words[:2]) if words[0] == "kat-timm" else words[0] for words in CLI_COMMANDS}
    assert {"kat-timm predict", "kat-timm plot", "kat-timm download", "kat-timm export", "kat-validate"} <= shown


@pytest.mark.parametrize("words", CLI_COMMANDS, ids=[" ".join(w)[:60] for w in CLI_COMMANDS])
def test_readme_cli_command_parses(words, monkeypatch, capsys):
    """Every kat-timm / kat-validate command the README shows is accepted by the command's own parser as written
    (the run itself stops right after parsing: the README's files and weights are not here)."""
    import argparse

    import kat_timm.cli
    import kat_timm.cli.validate

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    original = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    main = kat_timm.cli.main if words[0] == "kat-timm" else kat_timm.cli.validate.main
    try:
        main(words[1:])
    except _Parsed:
        return
    except SystemExit as error:
        pytest.fail(f"{' '.join(words)}: the parser refused it (exit {error.code}): {capsys.readouterr().err}")
    pytest.fail(f"{' '.join(words)}: finished without parsing any arguments")


def _undefined_names(block: str) -> set:
    """Names ``block`` reads but neither imports nor defines (builtins aside), nor declares as the reader's own in a
    comment ("# image: a PIL image")."""
    import ast
    import builtins

    tree = ast.parse(block)
    defined = set(dir(builtins)) | set(re.findall(r"#\s*(\w+):", block))
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else defined).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return used - defined


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.splitlines()[0][:40] for b in PYTHON_BLOCKS])
def test_every_snippet_imports_what_it_uses(block):
    """Also the snippets that can't run here (released weights, the Hub): copied alone, each must at least not fail
    on a missing import."""
    assert not _undefined_names(block), f"the snippet uses {sorted(_undefined_names(block))} without importing them"

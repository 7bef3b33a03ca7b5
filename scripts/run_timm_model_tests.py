#!/usr/bin/env python
"""Run timm's own model test suite (``tests/test_models.py``) on the KAT models.

timm's wheel lacks its tests, so the sdist of the installed version is fetched from PyPI once (``pip download``;
the only network access) into a cache directory and its test_models.py runs here with ``TORCH_BACKEND=kat_timm``,
only the tests parametrised with a KAT model selected. By default a copy adds ``'kat*'`` to ``NON_STD_FILTERS`` and
``'kat'`` to ``FEAT_INTER_FILTERS``, the treatment timm gives its own ViTs; ``--as-is`` runs the file unmodified
(the CNN-only checks then fail). Pretrained-weight tests need the Hub: ``--with-pretrained``.

Usage::

    python scripts/run_timm_model_tests.py --models 'kat_tiny*'     # the tiny ones only (cheapest)
    python scripts/run_timm_model_tests.py --dir /tmp/timm-sdist -- -x -k backward   # extra args go to pytest

Exit status: pytest's.
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import os
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Dict, List, Sequence, Set, Tuple

BACKEND_MODULE = "kat_timm"
PRETRAINED_TESTS = ("test_model_load_pretrained", "test_model_features_pretrained")
PATCH_ANCHOR = "NUM_NON_STD = len(NON_STD_FILTERS)"
PATCH_LINES = (
    "# kat_timm: treat KAT like timm's own ViTs (non-standard model, forward_intermediates support)\n"
    "NON_STD_FILTERS.append('kat*')\n"
    "FEAT_INTER_FILTERS.append('kat')\n"
)


def fetch_sdist(timm_version: str, cache_dir: Path) -> Path:
    """The sdist of timm ``timm_version`` under ``cache_dir``: downloaded when missing, then the two files pytest reads
    (tests/test_models.py, and pyproject.toml for its markers) unpacked."""
    root = cache_dir / f"timm-{timm_version}"
    if (root / "tests" / "test_models.py").is_file():
        return root
    archive = cache_dir / f"timm-{timm_version}.tar.gz"
    if not archive.is_file():
        print(f"[run_timm_model_tests] downloading the timm {timm_version} sdist from PyPI into {cache_dir}")
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                   f"timm=={timm_version}", "-d", str(cache_dir)]
        if subprocess.run(command).returncode != 0 or not archive.is_file():
            raise SystemExit(f"could not download the timm {timm_version} sdist (command: {' '.join(command)}); this "
                             f"needs network access to PyPI, or put timm-{timm_version}.tar.gz into {cache_dir} by "
                             "hand")
    print(f"[run_timm_model_tests] unpacking {archive}")
    with tarfile.open(archive) as tar:  # two files by exact name, written by us: nothing can land outside root
        for name in ("pyproject.toml", "tests/test_models.py"):
            if f"{root.name}/{name}" not in tar.getnames():
                raise SystemExit(f"{archive} has no {root.name}/{name}")
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(tar.extractfile(f"{root.name}/{name}").read())
    return root


def prepare_test_file(root: Path, as_is: bool) -> Path:
    """tests/test_models.py, or (default) the copy with KAT added to timm's ViT filter lists."""
    original = root / "tests" / "test_models.py"
    if as_is:
        return original
    text = original.read_text()
    if text.count(PATCH_ANCHOR) != 1 or "FEAT_INTER_FILTERS = [" not in text:
        raise SystemExit(f"{original} has no single {PATCH_ANCHOR!r} line / FEAT_INTER_FILTERS list: this timm "
                         "version's test file differs from the one this script knows; run with --as-is")
    patched = root / "tests" / "test_models_kat.py"
    patched.write_text(text.replace(PATCH_ANCHOR, PATCH_LINES + PATCH_ANCHOR))
    return patched


def test_name(nodeid: str) -> str:
    return nodeid.split("::")[-1].split("[")[0]


class KatSelection:
    """pytest plugin: keeps the tests parametrised with a selected model name and tallies their outcomes."""

    def __init__(self, models: Set[str], with_pretrained: bool):
        self.models, self.with_pretrained = models, with_pretrained
        self.outcomes: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.skips: Dict[Tuple[str, str], List[str]] = collections.defaultdict(list)
        self.failed: List[str] = []

    def _selected(self, item) -> bool:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("model_name") if callspec is not None else None
        if not isinstance(name, str) or name.split(".")[0] not in self.models:
            return False
        return self.with_pretrained or test_name(item.nodeid) not in PRETRAINED_TESTS

    def pytest_collection_modifyitems(self, config, items):
        keep = [item for item in items if self._selected(item)]
        config.hook.pytest_deselected(items=[item for item in items if not self._selected(item)])
        items[:] = keep

    def pytest_runtest_logreport(self, report):
        # a setup counts when it fails or skips, a teardown when it fails
        if report.when != "call" and not (report.failed or (report.skipped and report.when == "setup")):
            return
        name = test_name(report.nodeid)
        self.outcomes[name]["error" if report.failed and report.when != "call" else report.outcome] += 1
        if report.skipped:
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skips[(name, reason)].append(report.nodeid.split("[")[-1].rstrip("]"))
        elif report.failed:
            self.failed.append(report.nodeid)

    def summary(self, timm_version: str, test_file: Path, seconds: float) -> str:
        rows = {name: self.outcomes[name] for name in sorted(self.outcomes)}
        rows["TOTAL"] = sum(rows.values(), collections.Counter())
        width = max([len(n) for n in self.outcomes] + [10])
        return "\n".join(
            ["", f"timm {timm_version} {test_file.name} on {len(self.models)} KAT model(s), {seconds:.0f} s"]
            + [f"  {name:<{width}}  " + "  ".join(f"{k} {c[k]}" for k in sorted(c)) for name, c in rows.items()]
            + [f"  skipped {name} x{len(ids)}: {reason}" for (name, reason), ids in sorted(self.skips.items())]
            + [f"  FAILED {nodeid}" for nodeid in self.failed])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Other arguments are passed on to pytest.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    parser.add_argument("--dir", type=Path, default=Path(cache_home) / "kat_timm" / "timm-sdist",
                        help="cache directory for the timm sdist (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=["kat*"], metavar="GLOB",
                        help="KAT model names or patterns to test (default: kat*)")
    parser.add_argument("--as-is", action="store_true",
                        help="run the unmodified test_models.py (KAT is not in timm's ViT filter lists there)")
    parser.add_argument("--with-pretrained", action="store_true",
                        help="also run the tests that download pretrained weights from the Hugging Face Hub")
    args, pytest_args = parser.parse_known_args(argv)
    pytest_args = [a for a in pytest_args if a != "--"]

    timm_version = package_version("timm")
    root = fetch_sdist(timm_version, args.dir.expanduser())
    test_file = prepare_test_file(root, args.as_is)

    # test_models.py imports $TORCH_BACKEND at import time: set it before pytest collects the file.
    os.environ["TORCH_BACKEND"] = BACKEND_MODULE
    import pytest
    import timm

    __import__(BACKEND_MODULE)
    models = {m for pattern in args.models for m in timm.list_models(pattern) if fnmatch.fnmatch(m, "kat*")}
    if not models:
        raise SystemExit(f"no KAT model matches {args.models}; known: {timm.list_models('kat*')}")

    plugin = KatSelection(models, args.with_pretrained)
    # importlib: pytest must not put the sdist root (which holds an uninstalled copy of timm) on sys.path; the
    # warnings: @pytest.mark.timeout without pytest-timeout, and plugins timm imported before pytest started.
    command = [str(test_file), "--import-mode=importlib", "-p", "no:cacheprovider", "-W",
               "ignore::pytest.PytestUnknownMarkWarning", "-W", "ignore::pytest.PytestAssertRewriteWarning", "-rfEs",
               *pytest_args]
    print(f"[run_timm_model_tests] TORCH_BACKEND={BACKEND_MODULE} pytest {' '.join(command)}")
    print(f"[run_timm_model_tests] models: {', '.join(sorted(models))}")
    start = time.perf_counter()
    code = pytest.main(command, plugins=[plugin])
    print(plugin.summary(timm_version, test_file, time.perf_counter() - start))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())

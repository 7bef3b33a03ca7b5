"""The table of rational-function initialisations (``rational_inits.json``, data written by
``scripts/fit_rational.py``).

Each entry holds numerator a0..a5 and denominator b1..b4 fitted to a target activation under THIS formula
(|b_j| |x|^j terms), with its fit range and measured max abs error.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Dict, List, Tuple

__all__ = ["RATIONAL_INITS_PATH", "rational_inits", "rational_init"]

RATIONAL_INITS_PATH = Path(__file__).with_name("rational_inits.json")


@functools.lru_cache(maxsize=None)
def _load() -> Dict[str, dict]:
    with open(RATIONAL_INITS_PATH, encoding="utf-8") as handle:
        return json.load(handle)


def rational_inits() -> Dict[str, dict]:
    """All entries of the table: name -> {numerator, denominator, fit_range, max_abs_error, ...} (a copy)."""
    return {name: dict(entry) for name, entry in _load().items()}


def rational_init(name: str) -> Tuple[List[float], List[float]]:
    """Numerator (6 values) and denominator (4 values) of the init called ``name``.

    Raises:
        ValueError: ``name`` is not in the table; the message lists the names that are.
    """
    table = _load()
    if name not in table:
        raise ValueError(
            f"unknown rational init {name!r}; known: {', '.join(sorted(table))} "
            f"(add one with scripts/fit_rational.py --name NAME --expr EXPRESSION)"
        )
    entry = table[name]
    return list(entry["numerator"]), list(entry["denominator"])

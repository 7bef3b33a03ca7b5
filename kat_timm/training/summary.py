"""Reading a run's ``summary.csv`` (one row per epoch, timm's ``update_summary`` columns: ``epoch``, ``train_loss``,
``eval_top1``, ``eval_ema_top1``, ..., ``lr``) back: what kat-validate says about EMA weights and what a published
model card reports come from it."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Optional, Union

__all__ = ["EmaComparison", "compare_ema", "read_summary", "run_summary"]

Row = Dict[str, float]


def read_summary(path: Union[str, Path]) -> List[Row]:
    """The rows of a summary.csv as numbers (a cell that is not one is left out); [] when the file is absent or
    unreadable: it is a record to report from, never needed to load a model."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    numeric = []
    for row in rows:
        values = {}
        for key, text in row.items():
            try:
                values[key] = float(text)
            except (TypeError, ValueError):
                continue
        if "epoch" in values:
            numeric.append(values)
    return numeric


def run_summary(checkpoint: Union[str, Path]) -> List[Row]:
    """The summary.csv rows of the run folder ``checkpoint`` lies in ([] when it has none)."""
    return read_summary(Path(checkpoint).parent / "summary.csv")


class EmaComparison:
    """The raw and EMA weights' evaluation at one epoch of a run: ``raw``, ``ema`` (top-1, %), ``epoch``."""

    def __init__(self, epoch: int, raw: float, ema: float):
        self.epoch, self.raw, self.ema = epoch, raw, ema

    @property
    def ema_better(self) -> bool:
        return self.ema > self.raw

    def describe(self) -> str:
        """"top-1 66.67 (EMA) vs 33.33 (raw) at epoch 3"."""
        first, second = ((self.ema, "EMA"), (self.raw, "raw")) if self.ema_better else ((self.raw, "raw"),
                                                                                         (self.ema, "EMA"))
        return f"top-1 {first[0]:.2f} ({first[1]}) vs {second[0]:.2f} ({second[1]}) at epoch {self.epoch}"


def compare_ema(rows: List[Row], epoch: Optional[int]) -> Optional[EmaComparison]:
    """The raw vs EMA top-1 of ``epoch``'s row (None: no such row, or no EMA or evaluation in it)."""
    if epoch is None:
        return None
    row = next((row for row in rows if int(row["epoch"]) == int(epoch)), None)
    if row is None or "eval_top1" not in row or "eval_ema_top1" not in row:
        return None
    if not (math.isfinite(row["eval_top1"]) and math.isfinite(row["eval_ema_top1"])):
        return None
    return EmaComparison(int(epoch), row["eval_top1"], row["eval_ema_top1"])

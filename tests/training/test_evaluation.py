"""kat_timm.training.evaluation: the AMP choice and the worker default."""
from __future__ import annotations

import os

import torch

from kat_timm.training.evaluation import default_workers


def test_amp_dtype_given_explicitly_wins_on_every_device():
    from kat_timm.training.evaluation import default_amp_dtype


    assert default_amp_dtype(None, torch.device("cpu")) == "bfloat16"
    assert default_amp_dtype(None, torch.device("cuda")) == "float16"
    assert default_amp_dtype("float16", torch.device("cpu")) == "float16"
    assert default_amp_dtype("bfloat16", torch.device("cuda")) == "bfloat16"


def test_default_workers_never_exceed_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers() == 2 and default_workers(1) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers() == 4

"""kat_timm.training.saver: timm's CheckpointSaver with atomic writes."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from kat_timm.training import saver as saver_module
from kat_timm.training.saver import AtomicCheckpointSaver


def test_atomic_saver_never_exposes_a_partial_checkpoint(tmp_path, monkeypatch):
    """Every file under a *.pth.tar name appears by rename, complete; timm's unlink-then-rename is gone."""
    model = torch.nn.Linear(3, 2)
    saver = AtomicCheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(tmp_path),
                                  max_history=2)
    complete_names = []
    real_replace = os.replace

    def watch_replace(src, dst):
        assert not str(src).endswith(".pth.tar") or Path(src).name == "tmp.pth.tar", src
        assert torch.load(src, weights_only=True)["epoch"] >= 0, f"{src} is incomplete when renamed"
        complete_names.append(Path(dst).name)
        real_replace(src, dst)

    unlinked = []
    monkeypatch.setattr(saver_module.os, "replace", watch_replace)
    monkeypatch.setattr(os, "unlink", lambda path: unlinked.append(path))
    for epoch, metric in enumerate([1.0, 3.0, 2.0]):
        saver.save_checkpoint(epoch, metric)
    assert not unlinked, "last.pth.tar must be replaced, never deleted first"
    assert {"tmp.pth.tar", "last.pth.tar", "checkpoint-0.pth.tar", "checkpoint-1.pth.tar", "model_best.pth.tar",
            "checkpoint-2.pth.tar"} <= set(complete_names)
    kept = sorted(path.name for path in tmp_path.glob("checkpoint-*.pth.tar"))
    assert kept == ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar"], "the 2 best by metric are kept"
    assert torch.load(tmp_path / "model_best.pth.tar", weights_only=True)["epoch"] == 1

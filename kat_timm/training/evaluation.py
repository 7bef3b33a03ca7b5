"""Evaluation shared by ``kat-train`` (after every epoch) and ``kat-validate``: the loader, the loop, the AMP choice;
exact sums, so both report the same numbers for the same weights."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, ContextManager, Dict, Optional

import torch

from kat_timm.training.data import DataError, collate_readable

__all__ = ["amp_autocast", "create_eval_loader", "default_amp_dtype", "default_workers", "evaluate"]


def default_workers(wanted: int = 4) -> int:
    """``--workers`` when not given: ``wanted``, or fewer on a machine with fewer usable CPUs, where PyTorch's
    DataLoader would warn about (and be slowed by) more worker processes than cores."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(wanted, usable))


def create_eval_loader(dataset, data_config: Dict[str, Any], batch_size: int, workers: int,
                       rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A loader of ``dataset`` with timm's evaluation transform for ``data_config``, leaving out undecodable images.
    Process ``rank`` takes every ``world_size``-th image (a streamed dataset: its own shards), so together they see
    every image exactly once, where timm's distributed evaluation pads with repeats."""
    from timm.data import create_transform

    if hasattr(dataset, "skip_unreadable"):  # an unreadable image is left out, not replaced by (and counted as) another
        dataset.skip_unreadable = True
    dataset.transform = create_transform(
        data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"))
    indices = None
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        indices = list(range(rank, len(dataset), world_size))
    elif hasattr(dataset, "set_loader_cfg"):  # a streamed reader splits its shards between loader workers itself
        dataset.set_loader_cfg(num_workers=workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
                                       pin_memory=pin_memory, persistent_workers=False, collate_fn=collate_readable)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext,
             distributed: bool = False) -> Dict[str, float]:
    """``{"loss", "top1", "top5", "count", "seconds", "images_per_second"}`` of ``model`` over ``loader``: the
    cross-entropy, top-1 and top-5 accuracy in % (top-``num_classes`` below 5 classes), from float64 sums added across
    processes when ``distributed``, so exact and the same on every rank."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    start = time.perf_counter()
    for batch in loader:
        if batch is None:  # every image of this batch was unreadable (see create_eval_loader)
            continue
        images, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hits = top.eq(targets[:, None])
        sums += torch.stack([
            torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double(),
            hits[:, 0].sum().double(), hits.any(dim=-1).sum().double(),
            torch.tensor(float(targets.numel()), dtype=torch.float64, device=device)])
    if distributed:
        torch.distributed.all_reduce(sums)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    if count == 0:
        raise DataError("the evaluation split yielded no images")
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
            "count": int(count), "seconds": seconds, "images_per_second": count / max(seconds, 1e-9)}


def default_amp_dtype(dtype_name: Optional[str], device: torch.device) -> str:
    """``--amp-dtype`` when given, else float16 on CUDA and bfloat16 on the CPU, where float16 autocast runs many
    times slower than float32 (README, under "--amp", has the measured numbers)."""
    if dtype_name:
        return dtype_name
    return "float16" if device.type == "cuda" else "bfloat16"


def amp_autocast(enabled: bool, dtype_name: Optional[str], device: torch.device) -> Callable[[], ContextManager]:
    """A factory of the autocast context for ``--amp``/``--amp-dtype`` on ``device`` (a null context when off)."""
    dtype_name = default_amp_dtype(dtype_name, device)
    if not enabled:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)



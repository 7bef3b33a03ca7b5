"""The training loop of ``kat-train``: one epoch as timm's train.py runs it, the loss it picks, the progress line."""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional

__all__ = ["Progress", "TrainResult", "TrainingError", "base_lr", "create_loss", "train_one_epoch"]


class TrainingError(RuntimeError):
    """The run cannot go on (the loss diverged); the message says what to change."""


@dataclass
class TrainResult:
    """What ``train`` returns: the unwrapped model, its EMA copy, the run folder (None off rank 0), one dict per epoch
    run (epoch, train_loss, lr, eval_*) and the best ``--eval-metric`` with its epoch (None without evaluation)."""

    model: Any
    model_ema: Any
    optimizer: Any
    output_dir: Optional[str]
    start_epoch: int
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None


class Progress:
    """A tqdm bar with ETA and images/s on a terminal; otherwise a line every ``interval`` steps and at the end."""

    def __init__(self, total: int, description: str, enabled: bool, interval: int):
        self.total, self.description, self.enabled, self.interval = total, description, enabled, max(1, interval)
        self.start = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, unit="step", dynamic_ncols=True, leave=True)

    def update(self, step: int, images: int, **values: float) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = images / max(elapsed, 1e-9)
        shown = {name: f"{value:.4g}" for name, value in values.items()}
        if self.bar is not None:
            postfix = ", ".join(f"{name}={value}" for name, value in shown.items())
            self.bar.set_postfix_str(f"{postfix}, {rate:.1f} img/s", refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.interval == 0 or step == self.total:
            remaining = elapsed / step * (self.total - step)
            fields = "  ".join(f"{name} {value}" for name, value in shown.items())
            print(f"{self.description} [{step:>{len(str(self.total))}}/{self.total}]  {fields}  {rate:.1f} img/s  "
                  f"ETA {datetime.timedelta(seconds=round(remaining))}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def base_lr(optimizer) -> float:
    """The learning rate the progress line, the epoch line and summary.csv show: the largest group's (the head's under
    ``--layer-decay``), not timm's mean over the groups, which under layer decay no group runs at."""
    return max(group["lr"] for group in optimizer.param_groups)


def create_loss(args: argparse.Namespace, mixing: bool, device):
    """The training loss timm's train.py picks for ``args`` (bce_loss, bce_target_thresh, smoothing) and mixing."""
    import torch
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    smoothing = 0 if mixing else args.smoothing  # Mixup's soft targets already include the label smoothing
    if args.bce_loss:  # without a smoothing, timm's BinaryCrossEntropy keeps its own default, as in timm's train.py
        options = dict(smoothing=smoothing) if smoothing else {}
        loss = BinaryCrossEntropy(target_threshold=args.bce_target_thresh, **options)
    elif mixing:
        loss = SoftTargetCrossEntropy()
    elif smoothing:
        loss = LabelSmoothingCrossEntropy(smoothing=smoothing)
    else:
        loss = torch.nn.CrossEntropyLoss()
    return loss.to(device)


def train_one_epoch(epoch: int, model, loader, optimizer, loss_fn, args: argparse.Namespace, device, *,
                    autocast, loss_scaler, lr_scheduler, model_ema, mixup_fn, saver, num_updates: int,
                    num_epochs: int, primary: bool,
                    folder_writes: Callable[[], ContextManager] = contextlib.nullcontext):
    """One pass over ``loader`` as timm's train.py makes it, with a recovery checkpoint every
    ``args.recovery_interval`` updates (``saver`` is None off rank 0). Returns ``({"loss": the mean over all
    processes}, num_updates so far)``; raises :class:`TrainingError` when the loss is NaN or infinite."""
    import torch
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad, unwrap_model

    model.train()
    steps = len(loader)
    accum = args.grad_accum_steps
    progress = Progress(steps, f"Train: {epoch}/{num_epochs - 1}", primary, args.log_interval)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x images, images
    images_seen = 0
    has_no_sync = hasattr(model, "no_sync")
    optimizer.zero_grad(set_to_none=True)
    try:
        for step, (images, targets) in enumerate(loader):
            group_start = step - step % accum
            group_size = min(accum, steps - group_start)  # the last group of an epoch may be shorter
            need_update = step - group_start == group_size - 1
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)

            sync = contextlib.nullcontext() if need_update or not has_no_sync else model.no_sync()
            with sync:
                with autocast():
                    output = model(images)
                    loss = loss_fn(output, targets)
                scaled = loss / group_size if group_size > 1 else loss
                if loss_scaler is not None:
                    loss_scaler(scaled, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                                parameters=model_parameters(model, exclude_head="agc" in args.clip_mode),
                                need_update=need_update)
                else:
                    scaled.backward()
                    if need_update:
                        if args.clip_grad is not None:
                            dispatch_clip_grad(model_parameters(model, exclude_head="agc" in args.clip_mode),
                                               value=args.clip_grad, mode=args.clip_mode)
                        optimizer.step()

            loss_value = loss.detach().float().item()
            if not math.isfinite(loss_value):
                raise TrainingError(f"the training loss became {loss_value} at epoch {epoch}, step {step}; lower --lr, "
                                    f"add --clip-grad 1.0, or use --amp-dtype bfloat16 instead of float16")
            batch = images.shape[0]
            sums += torch.tensor([loss_value * batch, batch], dtype=torch.float64, device=device)
            images_seen += batch * args.world_size

            if need_update:
                optimizer.zero_grad(set_to_none=True)
                num_updates += 1
                if model_ema is not None:
                    model_ema.update(unwrap_model(model), step=num_updates)
                if lr_scheduler is not None:
                    lr_scheduler.step_update(num_updates=num_updates, metric=float(sums[0] / sums[1]))
                if saver is not None and args.recovery_interval and num_updates % args.recovery_interval == 0:
                    with folder_writes():
                        saver.save_recovery(epoch, batch_idx=step)
            progress.update(step + 1, images_seen, loss=loss_value, lr=base_lr(optimizer))
    finally:
        progress.close()
    if hasattr(optimizer, "sync_lookahead"):
        optimizer.sync_lookahead()
    if args.distributed:
        torch.distributed.all_reduce(sums)
    loss_sum, count = sums.tolist()
    return OrderedDict(loss=loss_sum / max(count, 1.0)), num_updates

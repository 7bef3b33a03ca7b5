"""Image preprocessing of a model, as its pretrained config says (timm's data config and transform factory).

``create_transform(model)`` is ``timm.data.create_transform(**resolve_model_data_config(model), is_training=False)``
with one correction: a model built for another input size (``img_size=64``, ``set_input_size``, a checkpoint
fine-tuned at 32 px) gets images of that size, where timm's data config still says the registered 224.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple, Union

import torch

__all__ = ["create_transform", "model_input_size"]


def model_input_size(model: torch.nn.Module) -> Tuple[int, int, int]:
    """(channels, height, width) the model takes: its patch embedding's image size if it has one (that follows
    ``img_size=`` and ``set_input_size``), else timm's data config of the model."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    proj = getattr(patch_embed, "proj", None)
    if img_size is not None and isinstance(proj, torch.nn.Conv2d):
        return proj.in_channels, int(img_size[0]), int(img_size[1])
    from timm.data import resolve_model_data_config

    return tuple(resolve_model_data_config(model)["input_size"])


def create_transform(model: Union[torch.nn.Module, str], is_training: bool = False, **overrides: Any) -> Callable:
    """The preprocessing of ``model``'s pretrained config: PIL image -> normalised float tensor (C, H, W).

    Args:
        model: a timm model (its ``pretrained_cfg`` and input size are read), or a model name with an optional tag
            (no model is built; the registered pretrained config is used).
        is_training: the training augmentation (random resized crop, flip, ...) instead of the evaluation pipeline.
        **overrides: data-config values to change (``input_size``, ``interpolation``, ``mean``, ``std``,
            ``crop_pct``, ``crop_mode``) and any other keyword of ``timm.data.create_transform``.

    Returns:
        The transform (a torchvision ``Compose``).

    Raises:
        ValueError: a model name that timm does not know.
    """
    from timm.data import create_transform as timm_create_transform
    from timm.data import resolve_data_config, resolve_model_data_config

    if isinstance(model, str):
        import timm

        if not timm.models.is_model(timm.models.split_model_name_tag(model)[0]):
            raise ValueError(f"unknown model {model!r}; timm.list_models('kat*') lists the KAT models")
        pretrained_cfg = timm.models.get_pretrained_cfg(model)
        config = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    else:
        config = resolve_model_data_config(model)
        config["input_size"] = model_input_size(model)
    config.update(overrides)
    return timm_create_transform(**config, is_training=is_training)

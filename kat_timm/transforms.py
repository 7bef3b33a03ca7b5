"""Image preprocessing of a model, as its pretrained config says (timm's data config and transform factory).

For the released KAT checkpoints that is the evaluation pipeline they were scored with: resize the shorter side to
256 (224 / crop_pct 0.875) with bicubic interpolation, centre-crop 224, convert to a tensor, normalise with the
ImageNet mean and std. ``create_transform(model)`` is shorthand for::

    timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
"""
from __future__ import annotations

from typing import Any, Callable, Union

import torch

__all__ = ["create_transform"]


def create_transform(model: Union[torch.nn.Module, str], is_training: bool = False, **overrides: Any) -> Callable:
    """The preprocessing of ``model``'s pretrained config: PIL image -> normalised float tensor (C, H, W).

    Args:
        model: a timm model (its ``pretrained_cfg`` is read), or a model name with an optional tag (no model is
            built; the registered pretrained config is used).
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
    config.update(overrides)
    return timm_create_transform(**config, is_training=is_training)

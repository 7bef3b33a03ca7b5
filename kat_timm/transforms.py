"""Image preprocessing of a model, as its pretrained config says: timm's data config and transform factory, but at
the size the model was built for (``img_size=64``, ``set_input_size``), where timm's data config still says 224."""
from __future__ import annotations

from typing import Any, Callable, Tuple, Union

import torch

__all__ = ["create_transform", "model_input_size"]


def model_input_size(model: torch.nn.Module) -> Tuple[int, int, int]:
    """(channels, height, width) the model takes: its patch embedding's image size (which follows ``img_size=`` and
    ``set_input_size``), else timm's data config."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    proj = getattr(patch_embed, "proj", None)
    if img_size is not None and isinstance(proj, torch.nn.Conv2d):
        return proj.in_channels, int(img_size[0]), int(img_size[1])
    from timm.data import resolve_model_data_config

    return tuple(resolve_model_data_config(model)["input_size"])


def create_transform(model: Union[torch.nn.Module, str], is_training: bool = False, **overrides: Any) -> Callable:
    """PIL image -> normalised tensor as ``model``'s (a timm model or a model name) pretrained config says;
    ``overrides``: data-config values or other ``timm.data.create_transform`` keywords."""
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

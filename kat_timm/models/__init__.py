"""KAT models registered in timm's model registry (importing this package registers them)."""
from .from_vit import kat_from_vit, vit_state_dict_to_kat
from .kat import KAT, RELEASED_TOP1, checkpoint_filter_fn, mimetic_attention_init_

__all__ = [
    "KAT",
    "RELEASED_TOP1",
    "checkpoint_filter_fn",
    "kat_from_vit",
    "mimetic_attention_init_",
    "vit_state_dict_to_kat",
]

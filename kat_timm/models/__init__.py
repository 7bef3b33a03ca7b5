"""KAT models registered in timm's model registry (importing this package registers them)."""
from .kat import KAT, RELEASED_TOP1, checkpoint_filter_fn, mimetic_attention_init_

__all__ = ["KAT", "RELEASED_TOP1", "checkpoint_filter_fn", "mimetic_attention_init_"]

"""kat_timm: the Kolmogorov-Arnold Transformer (KAT) for timm.

KAT (Yang & Wang, 2024, arXiv 2409.10594) is a Vision Transformer whose MLP is a group-rational KAN: a learnable
rational function P(x)/Q(x), shared within groups of channels, before and after the first linear layer.

``import kat_timm`` registers the KAT models in timm: ``timm.create_model("kat_base", pretrained=True)``.
"""
from .layers import KAN, GroupRational
from .models import KAT, kat_from_vit
from .ops import group_rational
from .tools.plot import plot_rationals  # matplotlib is imported only when a figure is drawn
from .transforms import create_transform

__version__ = "0.1.0"

__all__ = [
    "KAN",
    "KAT",
    "GroupRational",
    "create_transform",
    "group_rational",
    "kat_from_vit",
    "plot_rationals",
    "__version__",
]

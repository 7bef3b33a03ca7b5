"""Layers built on the grouped rational op."""
from timm.models import register_notrace_module

from .group_rational import GroupRational, check_num_groups
from .kan import KAN, rational_second_moment
from .rational_inits import RATIONAL_INITS_PATH, rational_init, rational_inits

# fx tracing (timm's feature extraction) keeps the layer as a leaf instead of tracing into the custom op.
register_notrace_module(GroupRational)

__all__ = ["KAN", "GroupRational", "check_num_groups", "rational_second_moment", "RATIONAL_INITS_PATH", "rational_init", "rational_inits"]

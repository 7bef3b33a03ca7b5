"""Draw the learned rational activations of a KAT, one panel per GroupRational and one curve per channel group, on
matplotlib's Agg canvas without pyplot (no display needed, nothing kept in pyplot's global figure list)."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..layers import GroupRational
from ..ops import group_rational_reference

__all__ = ["REFERENCE_FUNCTIONS", "find_rationals", "plot_rationals", "rational_curves"]

INSTALL_HINT = 'plotting needs matplotlib: pip install matplotlib (or, in a kat_timm checkout, pip install -e ".[plot]")'

# The activations a rational is compared with, in float64.
REFERENCE_FUNCTIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "gelu": lambda x: torch.nn.functional.gelu(x),
    "swish": lambda x: x * torch.sigmoid(x),
}
REFERENCE_LABELS = {"identity": "identity", "gelu": "GELU", "swish": "swish"}
REFERENCES = ("init", *REFERENCE_FUNCTIONS)
# Init-table entries fitted to one of these functions on another range (kat_from_vit's act2 starts as "gelu_wide").
INIT_REFERENCES = {"gelu_wide": "gelu"}


def find_rationals(model: nn.Module) -> List[Tuple[str, GroupRational]]:
    """Every GroupRational of ``model`` as (qualified name, module), in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, GroupRational)]


@torch.no_grad()
def rational_curves(layer: GroupRational, x: torch.Tensor, use_layer: bool = False) -> torch.Tensor:
    """F_g(x) of every group g of ``layer`` on the 1-D grid ``x`` as a float64 (len(x), G) tensor: by the float64
    reference formula, or with ``use_layer`` by the layer itself."""
    groups = layer.num_groups
    grid = x.detach().to(torch.float64).reshape(-1, 1).expand(-1, groups)
    if use_layer:
        parameter = layer.weight_numerator
        inputs = grid.to(device=parameter.device, dtype=parameter.dtype).contiguous()
        # A (N, G) tensor has its channels on axis 1, which is also -1: right for either channel_dim.
        return layer(inputs).to(device="cpu", dtype=torch.float64)
    return group_rational_reference(grid, layer.weight_numerator.cpu(), layer.weight_denominator.cpu())


def require_matplotlib():
    """matplotlib's Figure and Agg canvas classes; an ImportError that says how to install them if missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return Figure, FigureCanvasAgg


def plot_rationals(model: nn.Module, reference: Optional[str] = "init", x_range: Tuple[float, float] = (-3.0, 3.0),
                   num_points: int = 241, use_layer: bool = False, title: Optional[str] = None,
                   panel_size: Tuple[float, float] = (3.2, 1.9)):
    """A matplotlib Figure of every rational of ``model``, one curve per channel group on ``x_range``: a row per
    module holding rationals, a column per rational name (act1, act2); ``reference``: the dashed curve ("init": the
    layer's init function); ``panel_size`` in inches (README, "Look at what the KAN learned")."""
    if reference is not None and reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)} or None, got {reference!r}")
    low, high = map(float, x_range)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"x_range must be two finite numbers (low, high) with low < high, got {x_range!r}")
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    rationals = find_rationals(model)
    if not rationals:
        raise ValueError(f"{type(model).__name__} has no GroupRational layers: nothing to plot (is it a KAT?)")
    Figure, FigureCanvasAgg = require_matplotlib()
    from matplotlib import colormaps

    # Rows: the parent modules, in order; columns: the leaf names (act1, act2), in order of first appearance.
    names = [name.rpartition(".") for name, _ in rationals]
    rows, columns = list(dict.fromkeys(n[0] for n in names)), list(dict.fromkeys(n[2] for n in names))

    x = torch.linspace(low, high, num_points, dtype=torch.float64)
    figure = Figure(figsize=(panel_size[0] * len(columns), panel_size[1] * len(rows) + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), len(columns), sharex=True, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)  # a KAN lacking one of the columns' rationals leaves its panel empty
    max_groups = max(layer.num_groups for _, layer in rationals)
    # Qualitative colours, one per group (a sequential map made neighbouring groups look alike); beyond ten groups
    # a wide-hued continuous map.
    if max_groups <= 10:
        colour = colormaps["tab10"]
    else:
        turbo = colormaps["turbo"]
        colour = lambda group: turbo(0.05 + 0.9 * group / (max_groups - 1))  # noqa: E731
    for name, layer in rationals:
        parent, _, leaf = name.rpartition(".")
        ax = axes[rows.index(parent), columns.index(leaf)]
        ax.set_visible(True)
        curves = rational_curves(layer, x, use_layer=use_layer).numpy()
        for group in range(curves.shape[1]):
            ax.plot(x.numpy(), curves[:, group], color=colour(group), linewidth=1.0, label=f"group {group}")
        init = INIT_REFERENCES.get(layer.init, layer.init)
        ref = (init if init in REFERENCE_FUNCTIONS else None) if reference == "init" else reference
        if ref is not None:
            ax.plot(x.numpy(), REFERENCE_FUNCTIONS[ref](x).numpy(), color="black", linestyle="--", linewidth=0.9,
                    label=REFERENCE_LABELS[ref])
        ax.set_title(f"{parent}.{leaf}" if parent else leaf, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, color="0.9", linewidth=0.5)  # grid lines, unlike axhline, are not among the axes' lines
        ax.set_xlim(low, high)
    for ax in axes[-1]:
        ax.set_xlabel("x", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("F(x)", fontsize=8)
    # One legend for the figure: every group once, and each dashed reference named with the panels it is on (act1
    # panels may show identity while act2 panels show swish: one panel's legend would name only one of them).
    entries: Dict[str, object] = {}
    panels: Dict[str, List[str]] = {}
    for ax in axes.flat:
        if ax.get_visible():
            leaf = ax.get_title().rpartition(".")[2]
            for handle, label in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(label, handle)
                if label in REFERENCE_LABELS.values() and leaf not in panels.setdefault(label, []):
                    panels[label].append(leaf)
    labels = [f"{label} ({', '.join(panels[label])})" if label in panels else label for label in entries]
    figure.legend(list(entries.values()), labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=7,
                  frameon=False)
    figure.suptitle(title or f"{type(model).__name__}: {len(rationals)} rational activations, "
                             f"one curve per channel group", fontsize=10)
    return figure

#!/usr/bin/env python
"""Fit group-rational initialisations for standard activations and write ``rational_inits.json``.

Fits F(x) = (a0 + ... + a5 x^5) / (1 + |b1||x| + ... + |b4||x|^4), the layer's formula (no poles), with ``a0`` pinned
to ``target(0)`` and the denominators stored as ``c_j = |b_j| >= 0``. All float64 and deterministic, in ``t = x / s``
(``s = max(|lo|, |hi|)``) for conditioning: Sanathanan-Koerner linearised least squares (BVLS), then nonlinear
least squares on the true error; then per mode ``minimax`` (best of least squares, an L^p continuation and a Lawson
iteration, by max error) or ``weighted`` (a Gaussian weight around 0 plus a uniform part, with an optional max-error
cap held by a penalty; for GELU, whose converted pre-activations cluster near 0). Errors are measured on a denser
grid than the fit grid. Usage: README, "The layer"; expressions are Python in ``x`` (a float64 tensor) with
``torch``, ``math`` and ``F`` available.

Only two kinds of expression are ever evaluated: the built-in entries' (``BUILTINS``, in this file) and one given
on the command line with ``--expr``. The table is data: an entry's stored ``"expression"`` is a record of what it
was fitted to and is never evaluated (a table can come from anywhere), so an entry that is not built in is kept as
it is unless refitted with ``--name NAME --expr EXPRESSION``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# The matrices are small (N x 9): BLAS threads only cost time, and badly so on a busy machine. Set before numpy loads;
# an explicit setting in the environment wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import least_squares, lsq_linear  # noqa: E402

from kat_timm.files import OutputPathError, edit_atomically, output_target  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join("kat_timm", "layers", "rational_inits.json")
DEFAULT_RANGE = (-3.0, 3.0)
DEFAULT_POINTS = 20001
EVAL_POINTS = 100001
NUM_DEGREE = 5  # a0..a5
DEN_DEGREE = 4  # b1..b4

# Built-in entries. ``mode`` is "exact" (no fitting), "minimax" or "weighted"; the weighted entries carry their
# Gaussian width, their uniform weight fraction and their max-error cap; ``fit_range`` replaces DEFAULT_RANGE.
GELU = "x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))"
BUILTINS = {
    "identity": dict(expression="x", mode="exact"),
    "swish": dict(expression="x * torch.sigmoid(x)", mode="minimax"),
    "tanh": dict(expression="torch.tanh(x)", mode="minimax"),
    "sigmoid": dict(expression="torch.sigmoid(x)", mode="minimax"),
    # min_b4: without it the fit lands on b4 = 0 and grows like 0.09 x^2: F(1e4) ~ 9e6 overflows float16.
    "gelu": dict(expression=GELU, mode="weighted", gaussian_sigma=0.5, uniform_weight=0.05, max_error_cap=2.5e-3,
                 min_b4=1e-3),
    # The GELU of ViT -> KAT conversions (kat_from_vit): trained ViTs' fc1 outputs reach |x| ~ 10, where the narrow
    # fit above is off by 0.8. Same weighting, a wider range and a looser cap: about 3x the narrow fit's error near
    # 0 (the best a 5/4 rational does over both; measured trade-off in scripts/README.md).
    "gelu_wide": dict(expression=GELU, mode="weighted", fit_range=(-10.0, 10.0), gaussian_sigma=0.5,
                      uniform_weight=0.05, max_error_cap=7.5e-3, min_b4=1e-3),
    "relu": dict(expression="torch.relu(x)", mode="minimax"),
    "leaky_relu": dict(expression="F.leaky_relu(x, negative_slope=0.01)", mode="minimax"),
}
DEFAULT_UNIFORM_WEIGHT = 0.05

LSQ_TOL = 1e-13
REFINE_POINTS = 4001  # grid of the minimax refinements (candidates are compared on the full fit grid)


class FitError(Exception):
    """A user-facing error (bad name, bad expression, bad range...)."""


def evaluate_expression(expression: str, x: np.ndarray) -> np.ndarray:
    """Evaluate ``expression`` (a Python expression in ``x``) on the float64 points ``x``."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64))
    namespace = {"torch": torch, "math": math, "F": torch.nn.functional, "np": np, "x": xt}
    try:
        with torch.no_grad():
            value = eval(expression, namespace)  # noqa: S307 - a local developer tool evaluating the user's input
    except Exception as exc:  # any failure of the user's expression
        raise FitError(f"expression {expression!r} failed to evaluate: {type(exc).__name__}: {exc}") from exc
    try:
        if isinstance(value, torch.Tensor):
            value = value.detach().to(torch.float64).cpu().numpy()
        value = np.broadcast_to(np.asarray(value, dtype=np.float64), xt.shape).copy()
    except Exception as exc:
        raise FitError(f"expression {expression!r} must give a number or a tensor of the shape of x, got "
                       f"{type(value).__name__} ({exc})") from exc
    if not np.all(np.isfinite(value)):
        bad = np.asarray(x)[~np.isfinite(value)]
        raise FitError(f"expression {expression!r} is not finite at x = {float(bad[0])!r} "
                       f"(and {bad.size - 1} other points)")
    return value


def rational(x: np.ndarray, numerator, denominator) -> np.ndarray:
    """F(x) on the float64 points ``x`` with the layer's formula (denominator through absolute values)."""
    p = sum(float(numerator[i]) * x**i for i in range(NUM_DEGREE + 1))
    q = 1.0 + sum(abs(float(denominator[j - 1])) * np.abs(x) ** j for j in range(1, DEN_DEGREE + 1))
    return p / q


class Problem:
    """Fitting data on a grid, in the scaled variable t = x / s. Unknowns theta = (alpha_1..alpha_5, gamma_1..gamma_4)."""

    def __init__(self, x: np.ndarray, f: np.ndarray, a0: float, scale: float, min_b4: float = 0.0):
        self.x, self.f, self.a0, self.scale, self.min_b4 = x, f, a0, scale, min_b4
        t = x / scale
        self.num_basis = np.stack([t**i for i in range(1, NUM_DEGREE + 1)], axis=1)  # (N, 5)
        self.den_basis = np.stack([np.abs(t) ** j for j in range(1, DEN_DEGREE + 1)], axis=1)  # (N, 4)
        self.lower = np.r_[np.full(NUM_DEGREE, -np.inf), np.zeros(DEN_DEGREE)]
        # |b4| > 0 makes F grow linearly (slope a5/|b4|) beyond the fit range instead of like x^(5-k).
        self.lower[-1] = min_b4 * scale**DEN_DEGREE

    def pq(self, theta):
        return self.a0 + self.num_basis @ theta[:NUM_DEGREE], 1.0 + self.den_basis @ theta[NUM_DEGREE:]

    def error(self, theta):
        p, q = self.pq(theta)
        return p / q - self.f

    def jacobian(self, theta):
        """d(P/Q)/d theta, shape (N, 9)."""
        p, q = self.pq(theta)
        return np.concatenate([self.num_basis / q[:, None], -(p / q**2)[:, None] * self.den_basis], axis=1)

    def subgrid(self, max_points):
        """The same problem on every k-th point (end points kept), for the iterative refinements."""
        if self.x.size <= max_points:
            return self
        idx = np.round(np.linspace(0, self.x.size - 1, max_points)).astype(int)  # distinct: the step exceeds 1
        return Problem(self.x[idx], self.f[idx], self.a0, self.scale, self.min_b4)

    def max_error(self, theta):
        return float(np.max(np.abs(self.error(theta))))

    def snap_negligible(self, theta, relative=1e-12):
        """Zero coefficients whose whole contribution on the range (|t| <= 1: at most the coefficient) is negligible,
        e.g. 1e-19 left by the optimiser, unless that grows the max error on the grid by more than 0.1 %."""
        f_scale = max(float(np.max(np.abs(self.f))), np.finfo(np.float64).tiny)
        snapped = np.array(theta, dtype=np.float64)
        snapped[:NUM_DEGREE][np.abs(snapped[:NUM_DEGREE]) < relative * f_scale] = 0.0
        snapped[NUM_DEGREE:][snapped[NUM_DEGREE:] < relative] = 0.0
        before, after = self.max_error(theta), self.max_error(snapped)
        return snapped if after <= before * (1.0 + 1e-3) + 1e-300 else theta

    def coefficients(self, theta):
        """Unscaled (numerator a0..a5, denominator c1..c4 >= 0) as Python floats."""
        powers = self.scale ** np.arange(1, NUM_DEGREE + 1, dtype=np.float64)
        return ([float(self.a0), *(theta[:NUM_DEGREE] / powers).tolist()],
                (np.abs(theta[NUM_DEGREE:]) / powers[:DEN_DEGREE] + 0.0).tolist())

    def solve(self, blocks, theta, max_nfev):
        """Bounded nonlinear least squares (trust-region reflective, denominators >= 0) of the residuals that
        ``blocks(e)`` makes of the error e: (value, d value / d e) pairs, elementwise functions of e, stacked."""
        def fun(th):
            return np.concatenate([value for value, _ in blocks(self.error(th))])

        def jac(th):
            jm = self.jacobian(th)
            return np.concatenate([jm * slope[:, None] for _, slope in blocks(self.error(th))])

        res = least_squares(fun, theta, jac=jac, bounds=(self.lower, np.inf), method="trf",
                            xtol=LSQ_TOL, ftol=LSQ_TOL, gtol=LSQ_TOL, max_nfev=max_nfev)
        return res.x  # within the bounds: trf keeps its iterates feasible

    def sanathanan_koerner(self, sqrt_w, iterations=20):
        """Linearised weighted least squares, reweighted by 1 / Q_prev, denominators bounded to >= 0."""
        q_prev = np.ones_like(self.x)
        theta = np.zeros(NUM_DEGREE + DEN_DEGREE)
        for _ in range(iterations):
            row = sqrt_w / q_prev
            a = np.concatenate([self.num_basis, -self.f[:, None] * self.den_basis], axis=1) * row[:, None]
            rhs = (self.f - self.a0) * row
            new = lsq_linear(a, rhs, bounds=(self.lower, np.inf), method="bvls").x  # feasible, as trf's
            converged = np.max(np.abs(new - theta)) <= 1e-12 * max(1.0, np.max(np.abs(new)))
            theta = new
            _, q_prev = self.pq(theta)
            if converged:
                break
        return theta

    def weighted_least_squares(self, sqrt_w, theta, max_nfev=500):
        return self.solve(lambda e: [(sqrt_w * e, sqrt_w)], theta, max_nfev)

    def lp_continuation(self, theta, powers=(4, 8, 16, 32), max_nfev=100):
        """Minimise sum |e|^p for growing p (each stage warm-started), as least squares on e |e|^((p-2)/2)."""
        for p in powers:
            e0 = self.max_error(theta)
            if e0 == 0.0:
                break
            k = (p - 2) / 2.0

            def blocks(e, e0=e0, k=k):
                r = e / e0
                return [(r * np.abs(r) ** k, (1.0 + k) * np.abs(r) ** k / e0)]

            theta = self.solve(blocks, theta, max_nfev)
        return theta

    def lawson(self, theta, iterations=100, inner_nfev=20):
        """Lawson-style minimax: weighted least squares with weights multiplied by |error| each round; keeps the best."""
        v = np.full(self.x.shape, 1.0 / self.x.size)
        best_err, best = self.max_error(theta), theta
        for _ in range(iterations):
            theta = self.weighted_least_squares(np.sqrt(v), theta, max_nfev=inner_nfev)
            r = np.abs(self.error(theta))
            m = float(r.max())
            if m < best_err:
                best_err, best = m, theta
            if m == 0.0:
                break
            v = v * (r / m)
            v = np.maximum(v / v.sum(), 1e-14 * v.max() / v.sum())
            v /= v.sum()
        return best

    def capped_weighted_least_squares(self, w, theta, cap, penalties=(1e1, 1e2, 1e3, 1e4, 1e5, 1e6), max_nfev=200):
        """Weighted least squares plus a growing quadratic penalty on |error| above 0.95 * cap."""
        n = self.x.size
        target = 0.95 * cap
        sqrt_w = np.sqrt(w / n) / cap
        for mu in penalties:
            sqrt_mu = math.sqrt(mu / n) / cap

            def blocks(e, sqrt_mu=sqrt_mu):
                penalty_slope = np.where(np.abs(e) > target, np.sign(e) * sqrt_mu, 0.0)
                return [(sqrt_w * e, sqrt_w), (sqrt_mu * np.maximum(np.abs(e) - target, 0.0), penalty_slope)]

            theta = self.solve(blocks, theta, max_nfev)
        return theta


def gaussian_weight(x, sigma, uniform):
    g = np.exp(-0.5 * (x / sigma) ** 2)
    mean = g.mean()
    if mean <= 0.0:  # the range lies far from 0: only the uniform part is left
        return np.ones_like(x)
    return (1.0 - uniform) * g / mean + uniform


def fit_entry(name, spec, lo, hi, points):
    """Fit one entry; returns (json_record, stats)."""
    expression, mode = spec["expression"], spec["mode"]
    a0 = float(evaluate_expression(expression, np.zeros(1))[0])
    x = np.linspace(lo, hi, points)
    f = evaluate_expression(expression, x)
    if mode == "exact":  # only the identity (build_spec makes any other expression a fit)
        numerator, denominator = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]
        note = "exact: F(x) = x (no fitting)"
    else:
        prob = Problem(x, f, a0, max(abs(lo), abs(hi)), spec.get("min_b4", 0.0))
        weighted = mode == "weighted"
        w = gaussian_weight(x, spec["gaussian_sigma"], spec["uniform_weight"]) if weighted else np.ones_like(x)
        theta = prob.weighted_least_squares(np.sqrt(w), prob.sanathanan_koerner(np.sqrt(w)))
        if not weighted:
            coarse = prob.subgrid(REFINE_POINTS)
            candidates = {"least squares": theta, "L^p continuation": coarse.lp_continuation(theta),
                          "Lawson iteration": coarse.lawson(theta)}
            which = min(candidates, key=lambda method: prob.max_error(candidates[method]))
            theta = candidates[which]
            note = ("uniform weight on the fit range: Sanathanan-Koerner linearised LSQ, nonlinear LSQ, then minimax "
                    f"refinement (best of LSQ / L^p p<=32 / Lawson: {which}); a0 pinned to target(0)")
        else:
            note = (f"weighted LSQ, weight (1-u)*N(0, sigma)/mean + u with sigma={spec['gaussian_sigma']:g}, "
                    f"u={spec['uniform_weight']:g} (Sanathanan-Koerner start, nonlinear LSQ)")
            cap = spec.get("max_error_cap")
            if cap is not None:
                theta = prob.capped_weighted_least_squares(w, theta, cap)
                note += f", max error on the fit range held under {cap:g} by a penalty"
                if prob.max_error(theta) > cap:
                    print(f"warning: {name}: max error {prob.max_error(theta):.3e} exceeds the cap {cap:g}",
                          file=sys.stderr)
            if spec.get("min_b4"):
                note += f", |b4| >= {spec['min_b4']:g} so the tails grow linearly"
            note += "; a0 pinned to target(0)"
        numerator, denominator = prob.coefficients(prob.snap_negligible(theta))

    stats = measure(expression, numerator, denominator, lo, hi)
    return dict(expression=expression, numerator=numerator, denominator=denominator, fit_range=[float(lo), float(hi)],
                max_abs_error=stats["max_abs_error"], note=note), stats


def measure(expression, numerator, denominator, lo, hi):
    x = np.linspace(lo, hi, EVAL_POINTS)
    err = np.abs(rational(x, numerator, denominator) - evaluate_expression(expression, x))
    near = np.abs(x) < 1.0
    return {"max_abs_error": float(err.max()),
            "max_abs_error_near_zero": float(err[near].max()) if near.any() else float("nan"),
            "f0": float(rational(np.zeros(1), numerator, denominator)[0])}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " See the module docstring for the method.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="built-in entries: " + ", ".join(BUILTINS) + "\nexamples:\n  python scripts/fit_rational.py\n"
               '  python scripts/fit_rational.py gelu swish\n  python scripts/fit_rational.py --name mish --expr '
               '"x * torch.tanh(torch.nn.functional.softplus(x))"\n')
    parser.add_argument("names", nargs="*", help="built-in entries to refit (default: all of them; the table's "
                        "other entries are kept as stored: their expressions are never evaluated)")
    parser.add_argument("--name", help="name of an entry to add or refit from --expr")
    parser.add_argument("--expr", help="Python expression in x (a float64 torch tensor; torch, math and "
                        "F = torch.nn.functional available)")
    parser.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"),
                        help="fit range (default: the entry's own, e.g. gelu_wide: -10 10; otherwise -3 3)")
    parser.add_argument("--output", default=None, help=f"JSON table to update (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--dry-run", action="store_true", help="print the results, do not write the table")
    parser.add_argument("--gaussian-sigma", type=float, help="fit with a Gaussian weight of this width around 0 plus "
                        "a uniform part (weighted least squares), for every entry refitted in this run; 0 means "
                        "uniform-weight minimax. Default: per entry (gelu: 0.5, the others: uniform minimax)")
    parser.add_argument("--uniform-weight", type=float, help=f"uniform fraction u of the weight "
                        f"(1-u)*gauss/mean(gauss) + u (default: per entry, {DEFAULT_UNIFORM_WEIGHT})")
    parser.add_argument("--max-error-cap", type=float, help="for weighted fits: keep the max error on the range under "
                        "this value (0: no cap; default: per entry, gelu: 2.5e-3, the others: none)")
    parser.add_argument("--points", type=int, default=DEFAULT_POINTS,
                        help=f"points of the fit grid (default: {DEFAULT_POINTS})")
    return parser.parse_args(argv)


def load_table(path):
    if not os.path.exists(path):
        return {}
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise FitError(f"cannot read the table {path}: {exc}") from exc
    if not isinstance(table, dict):
        raise FitError(f"{path}: expected a JSON object keyed by name")
    return table


def build_spec(name, expression, table, args):
    """The fitting spec of one entry: the built-in defaults, or the command line's ``--expr`` (never the table's
    stored expression, which is data), then the command line's options."""
    if expression is None and name not in BUILTINS:
        if name in table:
            raise FitError(f"{name!r} is not a built-in entry and the expression stored in the table is never "
                           f"evaluated; refit it with --name {name} --expr EXPRESSION")
        raise FitError(f"unknown entry {name!r} (built in: {', '.join(BUILTINS)}); "
                       f"give --name {name} --expr EXPRESSION")
    spec = dict(BUILTINS.get(name) or dict(mode="minimax"))
    if expression is not None:
        spec["expression"] = expression
        if spec["mode"] == "exact" and expression.strip() != "x":
            spec["mode"] = "minimax"
    if spec["mode"] != "exact":
        if args.gaussian_sigma is not None:
            if args.gaussian_sigma > 0:
                spec.update(mode="weighted", gaussian_sigma=args.gaussian_sigma)
                spec.setdefault("uniform_weight", DEFAULT_UNIFORM_WEIGHT)
            else:
                spec["mode"] = "minimax"
        if args.uniform_weight is not None:
            spec["uniform_weight"] = args.uniform_weight
        if args.max_error_cap is not None:
            spec["max_error_cap"] = args.max_error_cap if args.max_error_cap > 0 else None
    return spec


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.range is not None:
            lo, hi = args.range
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                raise FitError(f"--range needs finite LO < HI, got {lo!r} {hi!r}")
        if args.points < 101:
            raise FitError("--points must be at least 101")
        if args.uniform_weight is not None and not 0.0 <= args.uniform_weight <= 1.0:
            raise FitError("--uniform-weight must lie in [0, 1]")
        if args.expr is not None and not args.name:
            raise FitError("--expr needs --name")
        output = args.output or os.path.join(REPO_ROOT, DEFAULT_OUTPUT)
        try:
            output_target(output, label=f"--output {output}")  # a FIFO would block the read below
        except OutputPathError as exc:
            raise FitError(str(exc)) from None
        table = load_table(output)

        names = list(dict.fromkeys(args.names + ([args.name] if args.name else [])))
        kept = []
        if not names:  # every built-in entry; the table's other entries are data, kept as they are
            names = list(BUILTINS)
            kept = [name for name in table if name not in BUILTINS]

        specs = {name: build_spec(name, args.expr if name == args.name else None, table, args) for name in names}
        if args.expr is not None:  # fail early and clearly on a broken expression
            evaluate_expression(args.expr, np.linspace(*(args.range or DEFAULT_RANGE), 11))

        results = {}
        print(f"{'name':<14} {'max|err| range':>15} {'max|err| |x|<1':>15} {'F(0)':>12}  {'time':>6}")
        start = time.perf_counter()
        for name, spec in specs.items():
            t0 = time.perf_counter()
            lo, hi = args.range or spec.get("fit_range", DEFAULT_RANGE)
            record, stats = fit_entry(name, spec, lo, hi, args.points)
            results[name] = record
            print(f"{name:<14} {stats['max_abs_error']:>15.3e} {stats['max_abs_error_near_zero']:>15.3e} "
                  f"{stats['f0']:>12.5g}  {time.perf_counter() - t0:>5.1f}s")
        print(f"total {time.perf_counter() - start:.1f}s")
        if kept:
            print(f"kept as stored (not built in; refit one with --name NAME --expr EXPRESSION): {', '.join(kept)}")
    except FitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # Built-ins first in their order, then the other entries in the order they already had / were added.
    merged = {**table, **results}
    new_table = {name: merged[name] for name in dict.fromkeys([*BUILTINS, *table, *results]) if name in merged}
    if args.dry_run:
        print(json.dumps(results, indent=2))
        print("(dry run: nothing written)")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    text = json.dumps(new_table, indent=2) + "\n"
    edit_atomically(output, lambda partial: Path(partial).write_text(text), start_from_current=False,
                    label=f"--output {output}")
    print(f"wrote {output} ({len(results)} entr{'y' if len(results) == 1 else 'ies'} refitted, {len(new_table)} in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

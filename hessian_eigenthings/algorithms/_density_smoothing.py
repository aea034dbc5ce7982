r"""Gaussian smoothing of a quadrature measure onto a grid (used by SLQ and its result).

Given runs ``r = 1..R`` with nodes ``theta_{rj}`` and weights ``tau_{rj}`` (each run's
weights sum to 1), the smoothed density is

.. math::

    \phi_\sigma(t) = \frac{1}{R} \sum_{r=1}^R \sum_j \tau_{rj} \,
    \frac{1}{\sigma \sqrt{2\pi}} \exp\!\Big(-\frac{(t - x_{rj})^2}{2 \sigma^2}\Big),

with ``x = theta`` on the ``"linear"`` scale and ``x = log10|theta|`` on the ``"log"``
scale (nodes with ``|theta| <= zero_tol`` are left out there, see
:func:`smooth_density`). Each kernel integrates to 1, so ``phi`` integrates to the
total weight of the nodes it includes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["SCALES", "check_scale", "default_grid", "default_sigma", "smooth_density", "to_axis"]

SCALES = ("linear", "log")

# Default bandwidth: this fraction of the span of the (transformed) nodes.
_SIGMA_FRACTION = 1.0 / 100.0
# The default grid extends this many bandwidths beyond the extreme nodes.
_GRID_MARGIN = 5.0


def check_scale(scale: object) -> str:
    """Validate the density scale name."""
    if scale not in SCALES:
        raise ValueError(f"Unknown scale {scale!r}; expected one of {SCALES}.")
    return str(scale)


def to_axis(
    nodes: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    scale: str,
    zero_tol: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten the runs onto the plotting axis.

    Returns:
        ``(x, w, sign)``: positions on the axis, weights divided by the number of runs (so
        they sum to 1 over all runs) and the sign of each node. On the log scale nodes with
        ``|theta| <= zero_tol`` are dropped.
    """
    runs = len(nodes)
    theta = np.concatenate([np.asarray(n, dtype=np.float64) for n in nodes])
    w = np.concatenate([np.asarray(t, dtype=np.float64) for t in weights]) / runs
    if scale == "linear":
        return theta, w, np.sign(theta)
    keep = np.abs(theta) > zero_tol
    return np.log10(np.abs(theta[keep])), w[keep], np.sign(theta[keep])


def default_sigma(x: np.ndarray) -> float:
    """``span(x) / 100``; for a single point, ``1e-3 * max(|x|, 1)``."""
    if x.size == 0:
        return 1.0
    span = float(np.max(x) - np.min(x))
    if span > 0:
        return span * _SIGMA_FRACTION
    return 1e-3 * max(float(np.max(np.abs(x))), 1.0)


def default_grid(x: np.ndarray, sigma: float, num_grid_points: int) -> np.ndarray:
    """Uniform grid over ``[min x - 5 sigma, max x + 5 sigma]``."""
    if x.size == 0:
        return np.linspace(-1.0, 1.0, num_grid_points)
    lo = float(np.min(x)) - _GRID_MARGIN * sigma
    hi = float(np.max(x)) + _GRID_MARGIN * sigma
    return np.linspace(lo, hi, num_grid_points)


def smooth_density(x: np.ndarray, w: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """``sum_k w_k N(grid; x_k, sigma^2)`` with the normalised Gaussian kernel."""
    out = np.zeros_like(grid, dtype=np.float64)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    # Chunk the nodes to bound the (grid x nodes) temporary.
    chunk = max(1, 2_000_000 // max(grid.size, 1))
    for start in range(0, x.size, chunk):
        d = (grid[:, None] - x[None, start : start + chunk]) / sigma
        out += np.exp(-0.5 * d * d) @ w[start : start + chunk]
    return out * norm

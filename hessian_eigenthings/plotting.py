"""Matplotlib helpers for spectral densities and eigenvalues (needs the ``plot`` extra).

matplotlib is imported only when a function here is called, so the library itself does
not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from hessian_eigenthings.algorithms.estimator_results import SpectralDensityResult

__all__ = ["plot_eigenvalues", "plot_spectral_density"]

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


def _new_axes() -> Axes:
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on environment
        raise ImportError(
            "Plotting needs matplotlib: pip install 'hessian-eigenthings[plot]'"
        ) from err
    _, ax = plt.subplots(figsize=(6.0, 4.0))
    return ax


def _as_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy().reshape(-1)
    return np.asarray(values, dtype=np.float64).reshape(-1)


def plot_spectral_density(
    result: SpectralDensityResult,
    ax: Axes | None = None,
    *,
    scale: str | None = None,
    mark_eigenvalues: ArrayLike | None = None,
    yscale: str = "log",
    **line_kwargs: Any,
) -> Axes:
    """Plot a :class:`SpectralDensityResult` (re-smoothed on ``scale`` if given).

    On the log scale the positive and negative parts are drawn separately when there is
    negative mass, and ``mark_eigenvalues`` are placed at ``log10|lambda|``.

    Args:
        result: The SLQ result.
        ax: Axes to draw on; default a new figure.
        scale: ``"linear"`` or ``"log"``; default the result's own scale.
        mark_eigenvalues: Eigenvalues drawn as dashed vertical lines.
        yscale: ``"log"`` or ``"linear"`` y axis. On a log axis the density is clipped
            below at ``1e-10`` times its maximum.
        **line_kwargs: Passed to ``ax.plot``.

    Returns:
        The axes.
    """
    if yscale not in ("log", "linear"):
        raise ValueError(f"yscale must be 'log' or 'linear', got {yscale!r}.")
    if scale is not None and scale != result.scale:
        result = result.resmooth(scale=scale)
    if ax is None:
        ax = _new_axes()
    floor = 1e-10 * float(np.max(result.density)) if result.density.size else 0.0

    def shown(y: np.ndarray) -> np.ndarray:
        return np.maximum(y, floor) if yscale == "log" else y

    if result.scale == "log" and result.negative_mass > 0 and result.negative_density is not None:
        positive = result.density - result.negative_density
        ax.plot(result.grid, shown(positive), label="lambda > 0", **line_kwargs)
        ax.plot(result.grid, shown(result.negative_density), label="lambda < 0", **line_kwargs)
        ax.legend()
    else:
        ax.plot(result.grid, shown(result.density), **line_kwargs)
    if mark_eigenvalues is not None:
        marks = _as_numpy(mark_eigenvalues)
        if result.scale == "log":
            marks = np.log10(np.abs(marks[np.abs(marks) > result.zero_tol]))
        for x in marks:
            ax.axvline(float(x), color="0.4", linestyle="--", linewidth=0.8)
    ax.set_yscale(yscale)
    ax.set_xlabel("log10 |eigenvalue|" if result.scale == "log" else "eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(
        f"SLQ: {result.num_runs} runs x {result.lanczos_steps} steps, sigma={result.sigma:.3g}"
    )
    return ax


def plot_eigenvalues(
    values: ArrayLike,
    errors: ArrayLike | None = None,
    ax: Axes | None = None,
    **errorbar_kwargs: Any,
) -> Axes:
    """Plot eigenvalues against their index, with error bars if given.

    Args:
        values: Eigenvalues, shape ``(k,)``.
        errors: Per-eigenvalue error bars (e.g. residual norms), shape ``(k,)``.
        ax: Axes to draw on; default a new figure.
        **errorbar_kwargs: Passed to ``ax.errorbar``.

    Returns:
        The axes.

    Raises:
        ValueError: ``errors`` does not match ``values`` in length.
    """
    vals = _as_numpy(values)
    errs = None if errors is None else _as_numpy(errors)
    if errs is not None and errs.shape != vals.shape:
        raise ValueError(
            f"errors must have one entry per eigenvalue ({vals.size}), got {errs.size}."
        )
    if ax is None:
        ax = _new_axes()
    kwargs: dict[str, Any] = {"fmt": "o", "capsize": 3}
    kwargs.update(errorbar_kwargs)
    ax.errorbar(np.arange(vals.size), vals, yerr=errs, **kwargs)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    return ax

"""Matplotlib helpers for spectral densities and eigenvalues (needs the ``plot`` extra).

matplotlib is imported only when a function here is called, so the library itself does
not depend on it. This module sits below the algorithms: it knows a density result only
through the :class:`DensityLike` protocol (the fields it draws), so the results' own
``.plot()`` methods can call it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["DensityLike", "plot_eigenvalues", "plot_spectral_density"]

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


class DensityLike(Protocol):
    """What :func:`plot_spectral_density` reads of a density (a ``SpectralDensityResult``)."""

    scale: str
    grid: np.ndarray
    density: np.ndarray
    negative_density: np.ndarray | None
    zero_tol: float
    num_runs: int
    lanczos_steps: int
    sigma: float

    @property
    def negative_mass(self) -> float: ...

    def resmooth(self, *, scale: str | None = ...) -> DensityLike: ...


_RESIDUAL_GID = "hessian_eigenthings.residuals"
# Smallest density drawn on a log axis, relative to the maximum (see plot_spectral_density).
DYNAMIC_RANGE = 1e-6


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on environment
        raise ImportError(
            "Plotting needs matplotlib: pip install 'hessian-eigenthings[plot]'"
        ) from err
    return plt


def _new_axes() -> Axes:
    _, ax = _pyplot().subplots(figsize=(6.0, 4.0))
    return ax


def _as_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy().reshape(-1)
    return np.asarray(values, dtype=np.float64).reshape(-1)


def plot_spectral_density(
    result: DensityLike,
    ax: Axes | None = None,
    *,
    scale: str | None = None,
    mark_eigenvalues: ArrayLike | None = None,
    yscale: str = "log",
    dynamic_range: float = DYNAMIC_RANGE,
    **line_kwargs: Any,
) -> Axes:
    """Plot a :class:`SpectralDensityResult` (re-smoothed on ``scale`` if given).

    On the log scale the positive and negative parts are drawn separately when there is
    negative mass, and ``mark_eigenvalues`` are placed at ``log10|lambda|``.

    On a log y axis the density is shown over ``dynamic_range`` of its maximum: values
    below ``dynamic_range * max(density)`` are left out (the curve has gaps where the
    Gaussian tails of separated bumps fall below it) and the axis starts at that floor.
    The smoothed density between well separated Ritz values decays like a Gaussian, so
    without a floor it drops to the smallest float (or any fixed clip value), which says
    nothing about the spectrum; mass below ``1e-6`` of the peak is invisible at the
    scale of the plot anyway.

    A legend is always drawn (the density curve, its negative part, the marks).

    Args:
        result: The SLQ result.
        ax: Axes to draw on; default a new figure.
        scale: ``"linear"`` or ``"log"``; default the result's own scale.
        mark_eigenvalues: Eigenvalues drawn as dashed vertical lines.
        yscale: ``"log"`` or ``"linear"`` y axis.
        dynamic_range: Lowest density shown on a log y axis, relative to the maximum
            (default ``1e-6``); ignored on a linear axis.
        **line_kwargs: Passed to ``ax.plot`` (``label`` names the density curve; default
            ``"SLQ density"``).

    Returns:
        The axes.

    Raises:
        ValueError: Unknown ``yscale``, or ``dynamic_range`` outside ``(0, 1)``.
    """
    if yscale not in ("log", "linear"):
        raise ValueError(f"yscale must be 'log' or 'linear', got {yscale!r}.")
    if not (isinstance(dynamic_range, (int, float)) and 0.0 < dynamic_range < 1.0):
        raise ValueError(f"dynamic_range must be in (0, 1), got {dynamic_range!r}.")
    if scale is not None and scale != result.scale:
        result = result.resmooth(scale=scale)
    if ax is None:
        ax = _new_axes()
    peak = float(np.max(result.density)) if result.density.size else 0.0
    floor = dynamic_range * peak

    def shown(y: np.ndarray) -> np.ndarray:
        if yscale == "linear" or peak <= 0.0:
            return y
        return np.where(y >= floor, y, np.nan)  # NaN: matplotlib leaves a gap

    label = line_kwargs.pop("label", "SLQ density")
    if result.scale == "log" and result.negative_mass > 0 and result.negative_density is not None:
        positive = result.density - result.negative_density
        ax.plot(result.grid, shown(positive), label=f"{label}, lambda > 0", **line_kwargs)
        ax.plot(
            result.grid,
            shown(result.negative_density),
            label=f"{label}, lambda < 0",
            **line_kwargs,
        )
    else:
        ax.plot(result.grid, shown(result.density), label=label, **line_kwargs)
    if mark_eigenvalues is not None:
        marks = _as_numpy(mark_eigenvalues)
        if result.scale == "log":
            marks = np.log10(np.abs(marks[np.abs(marks) > result.zero_tol]))
        for j, x in enumerate(marks):
            ax.axvline(
                float(x),
                color="0.4",
                linestyle="--",
                linewidth=0.8,
                label="marked eigenvalues" if j == 0 else None,
            )
    ax.set_yscale(yscale)
    if yscale == "log" and peak > 0.0:
        ax.set_ylim(floor, 3.0 * peak)
    ax.set_xlabel("log10 |eigenvalue|" if result.scale == "log" else "eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(
        f"SLQ: {result.num_runs} runs x {result.lanczos_steps} steps, sigma={result.sigma:.3g}"
    )
    ax.legend(loc="best", fontsize="small")
    return ax


def _is_twin(ax: Axes, other: Axes) -> bool:
    """Whether ``other`` is a residual axes made by :func:`_residual_axes` for ``ax``."""
    return (
        other is not ax
        and other.get_gid() == _RESIDUAL_GID
        and ax.get_shared_x_axes().joined(ax, other)
    )


def _residual_axes(ax: Axes) -> Axes:
    """The log-scale residual axes that belongs to ``ax``: found, or a new twin on the right."""
    for other in ax.figure.axes:
        if _is_twin(ax, other):
            return other
    twin = ax.twinx()
    twin.set_gid(_RESIDUAL_GID)
    return twin


def plot_eigenvalues(
    values: ArrayLike,
    errors: ArrayLike | None = None,
    ax: Axes | None = None,
    *,
    residual_ax: Axes | None = None,
    converged: ArrayLike | None = None,
    first_index: int = 0,
    **errorbar_kwargs: Any,
) -> Axes:
    """Plot eigenvalues against their index; residuals (if given) on their own log axis.

    Residual norms ``||A v - lambda v||`` are often ``1e-4`` on eigenvalues of order 10:
    as error bars on the eigenvalue axis they are invisible. They are therefore drawn
    (as well as the error bars) on a separate log-scale axis: ``residual_ax`` if given;
    else, for a new figure, a second panel to the right; else a twin y axis on the right
    of ``ax`` (reused by later calls on the same ``ax``). Residuals that are exactly 0
    are drawn at the bottom of that axis. A legend is always drawn.

    Args:
        values: Eigenvalues, shape ``(k,)``.
        errors: Per-eigenvalue error bars (e.g. residual norms), shape ``(k,)``.
        ax: Axes of the eigenvalues; default a new figure.
        residual_ax: Axes of the residuals (set to a log scale here).
        converged: ``(k,)`` flags; pairs that did not converge get hollow residual
            markers and a "not converged" legend entry.
        first_index: Index of the first eigenvalue on the x axis (``1`` to match tables
            that count from 1).
        **errorbar_kwargs: Passed to ``ax.errorbar`` (``label`` names the series; default
            ``"eigenvalues"``).

    Returns:
        The eigenvalue axes (the residual axes is ``residual_ax``, or the figure's other
        axes).

    Raises:
        ValueError: ``errors`` or ``converged`` does not match ``values`` in length.
    """
    from matplotlib.ticker import MaxNLocator

    vals = _as_numpy(values)
    errs = None if errors is None else _as_numpy(errors)
    if errs is not None and errs.shape != vals.shape:
        raise ValueError(
            f"errors must have one entry per eigenvalue ({vals.size}), got {errs.size}."
        )
    conv = None
    if converged is not None:
        conv = _as_numpy(converged).astype(bool)
        if conv.shape != vals.shape:
            raise ValueError(
                f"converged must have one flag per eigenvalue ({vals.size}), got {conv.size}."
            )
    if ax is None:
        if errs is None:
            ax = _new_axes()
        else:
            _, (ax, residual_ax) = _pyplot().subplots(1, 2, figsize=(9.0, 3.8))
            residual_ax.set_gid(_RESIDUAL_GID)
    kwargs: dict[str, Any] = {"fmt": "o", "capsize": 3, "label": "eigenvalues"}
    kwargs.update(errorbar_kwargs)
    label = kwargs["label"]
    index = np.arange(vals.size) + first_index
    container = ax.errorbar(index, vals, yerr=errs, **kwargs)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.legend(loc="best", fontsize="small")
    if errs is None:
        return ax
    rax = residual_ax if residual_ax is not None else _residual_axes(ax)
    color = container.lines[0].get_color()
    positive = errs[errs > 0]
    bottom = float(positive.min()) / 10.0 if positive.size else 1e-16
    shown = np.where(errs > 0, errs, bottom)
    ok = np.ones(vals.size, dtype=bool) if conv is None else conv
    rax.plot(index[ok], shown[ok], "s", color=color, label=f"{label}: residual")
    if not ok.all():
        rax.plot(
            index[~ok],
            shown[~ok],
            "s",
            color=color,
            markerfacecolor="none",
            label=f"{label}: residual, not converged",
        )
    rax.set_yscale("log")
    rax.xaxis.set_major_locator(MaxNLocator(integer=True))
    rax.set_ylabel("residual ||A v - lambda v||")
    if _is_twin(ax, rax):  # one legend for both, on the twin (drawn on top)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = rax.get_legend_handles_labels()
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
        rax.legend(h1 + h2, l1 + l2, loc="best", fontsize="small")
    else:
        rax.set_xlabel("index")
        rax.legend(loc="best", fontsize="small")
    return ax

"""Figures written by the command line: the spectrum and the eigenvalues with error bars.

Uses matplotlib's object-oriented API (``matplotlib.figure.Figure``) so that no GUI
backend is ever selected: the command works on headless machines and in CI.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hessian_eigenthings.cli.errors import BadInput

__all__ = ["require_matplotlib", "save_eigenvalue_figure", "save_spectrum_figure"]

_MARK_COLORS = ("tab:red", "tab:orange", "tab:green", "tab:purple")


def require_matplotlib() -> None:
    """Fail early (before any computation) when matplotlib is missing.

    Raises:
        BadInput: matplotlib is not installed.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise BadInput("figures need matplotlib: pip install 'hessian-eigenthings[plot]'")


def _figure(width: float = 7.0, height: float = 4.2) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _values(x: Any) -> list[float]:
    if isinstance(x, torch.Tensor):
        return [float(v) for v in x.detach().double().cpu().reshape(-1)]
    return [float(v) for v in x]


def save_spectrum_figure(
    density: Any,
    path: Path,
    *,
    eigenvalues: Mapping[str, Any] | None = None,
    title: str = "Spectral density",
) -> Path:
    """Plot an SLQ spectral density with top eigenvalues marked as vertical lines.

    Args:
        density: A :class:`~hessian_eigenthings.SpectralDensityResult` (its ``plot``
            draws the curve).
        path: PNG file to write (parent directories are created).
        eigenvalues: Label -> eigenvalues to mark (e.g. the Lanczos top-k).
        title: Figure title (the axes title gives the SLQ settings).

    Returns:
        ``path``.
    """
    fig = _figure()
    ax = fig.add_subplot()
    density.plot(ax=ax)
    log_axis = getattr(density, "scale", "linear") == "log"
    for (label, values), color in zip((eigenvalues or {}).items(), _MARK_COLORS):
        marks = _values(values)
        if log_axis:  # the density's axis is log10|lambda|
            marks = [math.log10(abs(lam)) for lam in marks if lam != 0.0]
        for j, lam in enumerate(marks):
            ax.axvline(
                lam, color=color, ls="--", lw=1.0, alpha=0.8, label=label if j == 0 else None
            )
    ax.set_title(ax.get_title(), fontsize="medium")
    fig.suptitle(title)
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def save_eigenvalue_figure(
    series: Mapping[str, Any],
    path: Path,
    *,
    title: str = "Eigenvalues",
    xlabel: str = "index",
    ylabel: str = "eigenvalue",
) -> Path:
    """Plot eigenvalues by index (left) and their residual norms on a log axis (right).

    For a symmetric matrix and a unit vector ``v``, some eigenvalue lies within
    ``||A v - theta v||`` of the Ritz value ``theta`` (Bauer-Fike / Kahan), so the
    residual norm is an honest error bar on each reported eigenvalue. It is usually many
    orders of magnitude smaller than the eigenvalue, hence its own log-scale panel;
    pairs that did not converge have hollow markers there.

    Args:
        series: Label -> an :class:`~hessian_eigenthings.EigenResult` (or any object
            with ``eigenvalues``, ``residuals`` and ``converged``).
        path: PNG file to write.
        title: Figure title.
        xlabel: Label of the index axis.
        ylabel: Label of the value axis.

    Returns:
        ``path``.
    """
    from matplotlib.ticker import MaxNLocator

    from hessian_eigenthings.plotting import plot_eigenvalues

    fig = _figure(width=9.0, height=3.9)
    ax, rax = fig.subplots(1, 2)
    low, high = 0.0, 0.0
    for label, result in series.items():
        vals = _values(result.eigenvalues)
        low, high = min([low, *vals]), max([high, *vals])
        plot_eigenvalues(
            vals,
            _values(result.residuals),
            ax=ax,
            residual_ax=rax,
            converged=[bool(c) for c in result.converged],
            first_index=1,
            label=label,
        )
    for a in (ax, rax):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel(xlabel)
        a.grid(alpha=0.3)
    if low < 0.0 < high:  # both signs: mark zero (never stretch the axis to reach it)
        ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title("eigenvalues (error bars: residual norms)", fontsize="medium")
    rax.set_title("residual norms (log scale)", fontsize="medium")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

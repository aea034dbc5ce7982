"""Figures: the density's dynamic range, residuals on their own log axis, legends.

The density is built from a known quadrature (two separated bumps), so where it falls
below ``1e-6`` of its peak is known exactly; the figures are inspected through
matplotlib's artists, not by eye.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hessian_eigenthings.algorithms.estimator_results import SpectralDensityResult  # noqa: E402
from hessian_eigenthings.algorithms.results import EigenResult  # noqa: E402
from hessian_eigenthings.plotting import plot_eigenvalues, plot_spectral_density  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures() -> Any:
    yield
    plt.close("all")


def two_bumps(scale: str = "linear") -> SpectralDensityResult:
    """Ritz values at 1 (mass 0.9) and 10 (mass 0.1), kernel width 0.3: a deep valley."""
    return SpectralDensityResult.from_quadrature(
        [np.array([1.0, 10.0])],
        [np.array([0.9, 0.1])],
        np.array([100.0]),
        lanczos_steps=2,
        operator_size=100,
        num_matvecs=2,
        distribution="rademacher",
        seed=0,
        zero_tol=1e-12,
        scale=scale,
        sigma=0.3,
        grid=np.linspace(-1.0, 12.0, 1301),
    )


def test_log_density_is_clipped_to_a_dynamic_range_with_gaps() -> None:
    res = two_bumps()
    ax = plot_spectral_density(res)
    y = np.asarray(ax.lines[0].get_ydata(), dtype=float)
    peak = float(res.density.max())
    below = res.density < 1e-6 * peak
    assert below.any() and (~below).any()
    assert np.isnan(y[below]).all()  # gaps, not a flat floor
    np.testing.assert_array_equal(y[~below], res.density[~below])
    assert ax.get_ylim()[0] == pytest.approx(1e-6 * peak)
    # the valley between the bumps (x in 3..8) is a gap, and both bumps are drawn
    valley = (res.grid > 3.0) & (res.grid < 8.0)
    assert np.isnan(y[valley]).all()
    assert np.isfinite(y[np.argmin(abs(res.grid - 10.0))])


def test_dynamic_range_option_and_linear_axis() -> None:
    res = two_bumps()
    ax = plot_spectral_density(res, dynamic_range=1e-2)
    y = np.asarray(ax.lines[0].get_ydata(), dtype=float)
    assert np.nanmin(y) >= 1e-2 * res.density.max()
    ax = plot_spectral_density(res, yscale="linear")
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), res.density)  # no clipping
    for bad in (0.0, 1.0, -1e-6):
        with pytest.raises(ValueError, match="dynamic_range"):
            plot_spectral_density(res, dynamic_range=bad)


def test_density_legend_is_always_present() -> None:
    res = two_bumps()
    ax = plot_spectral_density(res)
    ax.set_title("")  # a figure without a title still explains its curves
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["SLQ density"]
    ax = plot_spectral_density(res, mark_eigenvalues=[1.0, 10.0], label="Hessian")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["Hessian", "marked eigenvalues"]


def test_residuals_get_their_own_log_axis() -> None:
    vals = torch.tensor([29.0, 27.5, 25.0], dtype=torch.float64)
    res = torch.tensor([1e-4, 3e-4, 0.0], dtype=torch.float64)
    ax = plot_eigenvalues(vals, res, converged=[True, True, False], label="Hessian")
    fig = ax.figure
    assert len(fig.axes) == 2
    rax = fig.axes[1]
    assert rax.get_yscale() == "log" and ax.get_yscale() == "linear"
    shown = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in rax.lines])
    assert 1e-4 in shown and 3e-4 in shown
    assert shown.min() == pytest.approx(1e-5)  # the exact zero sits below the smallest
    hollow = [line for line in rax.lines if line.get_markerfacecolor() == "none"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [2]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Hessian"]
    assert [t.get_text() for t in rax.get_legend().get_texts()] == [
        "Hessian: residual",
        "Hessian: residual, not converged",
    ]


def test_residual_twin_axis_is_reused_on_a_given_axes() -> None:
    _, ax = plt.subplots()
    plot_eigenvalues([3.0, 2.0], [1e-5, 2e-5], ax=ax, label="Hessian", first_index=1)
    plot_eigenvalues([2.5, 1.5], [1e-6, 1e-6], ax=ax, label="GGN", first_index=1)
    twins = [a for a in ax.figure.axes if a is not ax]
    assert len(twins) == 1 and twins[0].get_yscale() == "log"
    assert list(ax.lines[0].get_xdata()) == [1, 2]
    legend = twins[0].get_legend()
    assert legend is not None and ax.get_legend() is None  # one legend, drawn on top
    assert [t.get_text() for t in legend.get_texts()] == [
        "Hessian",
        "GGN",
        "Hessian: residual",
        "GGN: residual",
    ]


def test_eigenvalue_plot_input_errors() -> None:
    with pytest.raises(ValueError, match="errors must have one entry"):
        plot_eigenvalues([1.0, 2.0], errors=[0.1])
    with pytest.raises(ValueError, match="converged must have one flag"):
        plot_eigenvalues([1.0, 2.0], errors=[0.1, 0.1], converged=[True])
    ax = plot_eigenvalues([1.0, 2.0])  # no residuals: one axes, legend still there
    assert len(ax.figure.axes) == 1 and ax.get_legend() is not None


def test_cli_eigenvalue_figure_has_a_log_residual_panel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    from hessian_eigenthings.cli.figures import save_eigenvalue_figure

    saved: list[Figure] = []
    real = Figure.savefig

    def capture(self: Figure, *args: Any, **kwargs: Any) -> Any:
        saved.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    k = 3
    result = EigenResult(
        eigenvalues=torch.tensor([29.2, 27.1, 25.4], dtype=torch.float64),
        eigenvectors=torch.empty(k, 0),
        residuals=torch.tensor([1e-4, 2e-4, 5e-4], dtype=torch.float64),
        converged=torch.tensor([True, True, False]),
        iterations=1,
        num_matvecs=30,
        which="LA",
    )
    save_eigenvalue_figure({"Hessian": result}, tmp_path / "e.png")
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    ax, rax = saved[0].axes
    assert rax.get_yscale() == "log" and ax.get_legend() is not None
    assert rax.get_legend() is not None
    assert ax.get_ylim()[0] > 20  # no zero line stretching an all-positive axis down to 0

"""Results of the stochastic estimators: trace, diagonal and spectral density.

Every result carries its error bar, the matvec budget it spent, the seed that reproduces
it, and round-trips through JSON with ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hessian_eigenthings._compat import deprecated
from hessian_eigenthings.algorithms._density_smoothing import (
    check_scale,
    default_grid,
    default_sigma,
    smooth_density,
    to_axis,
)
from hessian_eigenthings.algorithms._display import html_table
from hessian_eigenthings.algorithms._records import ResultRecord, StopReason

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["DiagonalResult", "SpectralDensityResult", "TraceResult"]


def _mean_stderr(samples: np.ndarray) -> tuple[float, float]:
    """Sample mean and its standard error ``std(ddof=1) / sqrt(m)`` (NaN for one sample)."""
    mean = float(np.mean(samples))
    if samples.size < 2:
        return mean, math.nan
    return mean, float(np.std(samples, ddof=1) / math.sqrt(samples.size))


@dataclass(eq=False)
class TraceResult(ResultRecord):
    """A stochastic estimate of ``tr(A)`` (or ``tr(f(A))``) with its standard error.

    Attributes:
        estimate: The trace estimate.
        stderr: Estimated standard deviation of ``estimate``; what it covers depends on
            the method (see the estimator's docstring). ``estimate +- 3 * stderr`` is the
            interval the library's tests check for coverage.
        num_matvecs: Operator products spent.
        operator_size: ``n``.
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or ``"slq"``.
        distribution: Probe distribution.
        seed: Seed that reproduces the run (drawn fresh when ``seed=None`` was passed).
        samples: The values whose spread gives ``stderr``: Hutchinson quadratic forms,
            Hutch++ residual quadratic forms, XTrace leave-one-out estimates, or SLQ
            per-run estimates.
        details: Method-specific sizes (sketch size, number of residual probes, ...).
        stop_reason: ``"completed"`` (the whole budget was spent as planned),
            ``"time_limit"`` (``time_limit=`` cut the run short: the estimate and stderr
            use only the products made, ``num_matvecs`` counts them, and ``details``
            says which partial estimator was used), ``"non_finite"`` (the partial result
            carried by a :class:`~hessian_eigenthings.errors.NonFiniteError`),
            or ``""`` when not recorded (e.g. results derived from an SLQ quadrature).
    """

    estimate: float
    stderr: float
    num_matvecs: int
    operator_size: int
    method: str
    distribution: str
    seed: int | None
    samples: np.ndarray
    details: dict[str, Any] = field(default_factory=dict)
    stop_reason: StopReason = ""

    @classmethod
    def from_samples(
        cls, samples: np.ndarray, *, offset: float | None = None, **fields: Any
    ) -> TraceResult:
        """The mean of ``samples`` (plus ``offset``) and its standard error.

        ``stderr = std(samples, ddof=1) / sqrt(m)``; ``fields`` are the other attributes.
        """
        mean, stderr = _mean_stderr(samples)
        estimate = mean if offset is None else offset + mean
        return cls(estimate=estimate, stderr=stderr, samples=samples, **fields)

    def interval(self, z: float = 3.0) -> tuple[float, float]:
        """``(estimate - z * stderr, estimate + z * stderr)``."""
        return (self.estimate - z * self.stderr, self.estimate + z * self.stderr)

    def __float__(self) -> float:
        return float(self.estimate)

    def __repr__(self) -> str:
        return (
            f"TraceResult(estimate={self.estimate:.6g}, stderr={self.stderr:.3g}, "
            f"method={self.method!r}, num_matvecs={self.num_matvecs}, "
            f"operator_size={self.operator_size})"
        )

    def _repr_html_(self) -> str:
        lo, hi = self.interval()
        summary = [
            ("estimate", f"{self.estimate:.8g} ± {self.stderr:.3g} (stderr)"),
            ("3-sigma interval", f"[{lo:.6g}, {hi:.6g}]"),
            ("method", self.method),
            ("probes", self.distribution),
            ("matvecs", str(self.num_matvecs)),
            ("n", str(self.operator_size)),
            ("seed", str(self.seed)),
            ("stop reason", self.stop_reason or "?"),
        ]
        return html_table("TraceResult", summary)


@dataclass(eq=False)
class DiagonalResult(ResultRecord):
    """A stochastic estimate of ``diag(A)`` with a per-entry standard error.

    Attributes:
        estimate: Estimated diagonal, shape ``(n_local,)``, float64, on the operator's
            device (XDiag: on its ``sketch_device`` if one was given).
        stderr: Per-entry standard error, same shape.
        num_matvecs: Operator products spent.
        operator_size: ``n``.
        method: ``"hutchinson"`` or ``"xdiag"``.
        distribution: Probe distribution.
        seed: Seed that reproduces the run.
        details: Method-specific sizes.
        stop_reason: ``"completed"``, ``"time_limit"`` (the estimate of the products made;
            ``details["partial_estimator"]`` says which), ``"non_finite"`` (the partial
            result of a :class:`~hessian_eigenthings.errors.NonFiniteError`),
            or ``""`` when not recorded.
    """

    estimate: torch.Tensor
    stderr: torch.Tensor
    num_matvecs: int
    operator_size: int
    method: str
    distribution: str
    seed: int | None
    details: dict[str, Any] = field(default_factory=dict)
    stop_reason: StopReason = ""

    def __repr__(self) -> str:
        return (
            f"DiagonalResult(method={self.method!r}, operator_size={self.operator_size}, "
            f"num_matvecs={self.num_matvecs}, mean stderr="
            f"{float(self.stderr.double().mean()):.3g})"
        )


@dataclass(eq=False)
class SpectralDensityResult(ResultRecord):
    r"""Stochastic Lanczos Quadrature estimate of the spectral density of ``A``.

    Each run ``r`` gives Gauss-quadrature nodes ``theta_{rj}`` (Ritz values) and weights
    ``tau_{rj}`` (squared first components of the eigenvectors of its Lanczos matrix
    ``T_r``; they sum to 1). The estimated eigenvalue distribution is the discrete measure
    ``(1/R) sum_r sum_j tau_{rj} delta_{theta_{rj}}``; ``density`` is that measure smoothed
    with a normalised Gaussian of width ``sigma`` and sampled on ``grid``.

    Scales:
        ``"linear"``: ``density`` is a density in ``lambda`` and integrates to 1 (up to the
        mass beyond the grid, which the default grid makes negligible).

        ``"log"``: ``density`` is a density in ``x = log10|lambda|`` (signs folded
        together; ``sigma`` is in decades). Nodes with ``|theta| <= zero_tol`` have no
        logarithm: their mass is ``zero_mass`` and is left out, so ``density``
        integrates to ``1 - zero_mass``. ``negative_density`` is the part contributed by
        negative nodes (the positive part is ``density - negative_density``) and
        ``negative_mass`` its integral.

    Masses: the fractions of eigenvalues below ``-zero_tol``, within ``[-zero_tol,
    zero_tol]`` and above ``zero_tol``, read from the quadrature nodes and weights (not
    from the smoothed density) and the same on both scales. Run ``r`` gives
    ``m_r = sum_j tau_{rj} [theta_{rj} in the class]``, an estimate of the probe measure
    ``mu_{v_r}`` of the class (exact up to the quadrature error at the class boundary,
    which a ``zero_tol`` of the run's resolution keeps small); each mass is the mean of
    the ``m_r`` over runs and its ``*_stderr`` the standard error of that mean,
    ``std(m_r, ddof=1) / sqrt(R)`` (NaN for one run), which covers the probe randomness.
    The three masses sum to 1. ``spectral_density`` sets ``zero_tol`` to the resolution
    of its runs by default: Lanczos cannot tell an eigenvalue closer to 0 than that from
    0, so ``zero_mass`` is "zero at this resolution", not "exactly zero".

    Attributes:
        grid: Evaluation points (``lambda`` or ``log10|lambda|``).
        density: Smoothed density on ``grid``.
        nodes: Per-run Ritz values (float64 arrays; a run is shorter after a Lanczos
            breakdown).
        weights: Per-run quadrature weights, each summing to 1.
        probe_norms_sq: ``||v_r||^2`` of each run's probe (``n`` for Rademacher probes),
            used to turn quadratures into trace estimates.
        num_runs: Number of probe vectors ``R``.
        lanczos_steps: Requested Lanczos steps per run.
        sigma: Kernel width on the axis of ``grid``.
        scale: ``"linear"`` or ``"log"``.
        trace: ``tr(A)`` estimated from the same runs (see :meth:`estimate_trace_of`).
        operator_size: ``n``.
        num_matvecs: Operator products spent.
        distribution: Probe distribution.
        seed: Seed that reproduces the run.
        zero_tol: Nodes with ``|theta| <= zero_tol`` count as zero (see Masses).
        zero_mass: Mass of those nodes.
        negative_mass: Mass of nodes ``< -zero_tol``.
        negative_density: Log scale only: the part of ``density`` from negative nodes.
        stop_reason: ``"completed"``, ``"time_limit"`` (fewer runs than requested:
            ``num_runs`` says how many), ``"non_finite"`` (the partial result of a
            :class:`~hessian_eigenthings.errors.NonFiniteError`: the runs
            completed before the bad product), or ``""`` when not recorded.
        positive_mass: Mass of nodes ``> zero_tol``.
        negative_mass_stderr: Standard error of ``negative_mass`` over runs.
        zero_mass_stderr: Standard error of ``zero_mass`` over runs.
        positive_mass_stderr: Standard error of ``positive_mass`` over runs.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: tuple[np.ndarray, ...]
    weights: tuple[np.ndarray, ...]
    probe_norms_sq: np.ndarray
    num_runs: int
    lanczos_steps: int
    sigma: float
    scale: str
    trace: TraceResult
    operator_size: int
    num_matvecs: int
    distribution: str
    seed: int | None
    zero_tol: float
    zero_mass: float
    negative_mass: float
    negative_density: np.ndarray | None = None
    stop_reason: StopReason = ""
    positive_mass: float = math.nan
    negative_mass_stderr: float = math.nan
    zero_mass_stderr: float = math.nan
    positive_mass_stderr: float = math.nan

    @classmethod
    def from_quadrature(
        cls,
        nodes: Sequence[np.ndarray],
        weights: Sequence[np.ndarray],
        probe_norms_sq: np.ndarray,
        *,
        lanczos_steps: int,
        operator_size: int,
        num_matvecs: int,
        distribution: str,
        seed: int | None,
        zero_tol: float,
        scale: str = "linear",
        sigma: float | None = None,
        grid: np.ndarray | Sequence[float] | None = None,
        num_grid_points: int = 1024,
        stop_reason: StopReason = "",
    ) -> SpectralDensityResult:
        """Smooth per-run quadrature rules into a density (no operator products).

        Args:
            nodes: Per-run Ritz values.
            weights: Per-run weights (each summing to 1).
            probe_norms_sq: Per-run ``||v_r||^2``.
            lanczos_steps: Requested Lanczos steps per run (recorded).
            operator_size: ``n``.
            num_matvecs: Products spent producing the quadrature (recorded).
            distribution: Probe distribution (recorded).
            seed: Seed (recorded).
            zero_tol: Threshold at or below which ``|theta|`` counts as zero (the
                masses; the nodes left out on the log scale).
            scale: ``"linear"`` or ``"log"``.
            sigma: Kernel width on the grid's axis; default ``span / 100`` of the
                (transformed) nodes.
            grid: Evaluation points; default ``num_grid_points`` uniform points over
                ``[min - 5 sigma, max + 5 sigma]`` of the (transformed) nodes.
            num_grid_points: Size of the default grid.
            stop_reason: Why the run stopped (recorded).

        Raises:
            ValueError: Unknown scale, non-positive ``sigma``, a grid that is not a
                1-D increasing array, or ``num_grid_points < 2``.
        """
        scale = check_scale(scale)
        nodes_t = tuple(np.asarray(n, dtype=np.float64).reshape(-1) for n in nodes)
        weights_t = tuple(np.asarray(w, dtype=np.float64).reshape(-1) for w in weights)
        if len(nodes_t) != len(weights_t) or len(nodes_t) == 0:
            raise ValueError(
                f"nodes and weights must be non-empty per-run sequences of equal length, "
                f"got {len(nodes_t)} and {len(weights_t)} runs."
            )
        x, w, sign = to_axis(nodes_t, weights_t, scale, zero_tol)
        if sigma is None:
            sigma = default_sigma(x)
        elif not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}.")
        sigma = float(sigma)
        if grid is None:
            if not isinstance(num_grid_points, int) or num_grid_points < 2:
                raise ValueError(f"num_grid_points must be an int >= 2, got {num_grid_points!r}.")
            grid_arr = default_grid(x, sigma, num_grid_points)
        else:
            grid_arr = np.asarray(grid, dtype=np.float64)
            if grid_arr.ndim != 1 or grid_arr.size < 2 or np.any(np.diff(grid_arr) <= 0):
                raise ValueError(
                    "grid must be a 1-D strictly increasing array of at least 2 points, got "
                    f"shape {grid_arr.shape}."
                )
        spacing = float(np.max(np.diff(grid_arr)))
        if spacing > sigma:
            warnings.warn(
                f"Grid spacing {spacing:.3g} exceeds the kernel width sigma={sigma:.3g}: the "
                "sampled density is spiky and its integral over the grid is inaccurate. Use "
                "more grid points or a larger sigma.",
                stacklevel=2,
            )
        density = smooth_density(x, w, grid_arr, sigma)
        negative_density: np.ndarray | None = None
        if scale == "log":
            neg = sign < 0
            negative_density = smooth_density(x[neg], w[neg], grid_arr, sigma)
        masses, stderrs = _quadrature_masses(nodes_t, weights_t, zero_tol)
        norms = np.asarray(probe_norms_sq, dtype=np.float64).reshape(-1)
        trace = _quadrature_trace(
            nodes_t, weights_t, norms, lambda t: t, num_matvecs, operator_size, distribution, seed
        )
        return cls(
            grid=grid_arr,
            density=density,
            nodes=nodes_t,
            weights=weights_t,
            probe_norms_sq=norms,
            num_runs=len(nodes_t),
            lanczos_steps=int(lanczos_steps),
            sigma=sigma,
            scale=scale,
            trace=trace,
            operator_size=int(operator_size),
            num_matvecs=int(num_matvecs),
            distribution=distribution,
            seed=seed,
            zero_tol=float(zero_tol),
            zero_mass=masses[1],
            negative_mass=masses[0],
            negative_density=negative_density,
            stop_reason=stop_reason,
            positive_mass=masses[2],
            negative_mass_stderr=stderrs[0],
            zero_mass_stderr=stderrs[1],
            positive_mass_stderr=stderrs[2],
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectralDensityResult:
        """Rebuild a result written by ``to_dict`` (arrays as float64 NumPy arrays).

        A payload written before the masses had error bars (no ``positive_mass``) gets
        all three masses and their standard errors recomputed from its stored quadrature
        and ``zero_tol``.
        """
        result = super().from_dict(data)
        if isinstance(data, dict) and "positive_mass" not in data:
            masses, stderrs = _quadrature_masses(result.nodes, result.weights, result.zero_tol)
            result.negative_mass, result.zero_mass, result.positive_mass = masses
            (
                result.negative_mass_stderr,
                result.zero_mass_stderr,
                result.positive_mass_stderr,
            ) = stderrs
        return result

    def resmooth(
        self,
        sigma: float | None = None,
        grid: np.ndarray | Sequence[float] | None = None,
        *,
        scale: str | None = None,
        num_grid_points: int | None = None,
    ) -> SpectralDensityResult:
        """Re-smooth the stored quadrature with another ``sigma``, grid or scale.

        No operator products: only the stored nodes and weights are used. Arguments left
        ``None`` keep the current value, except that changing the scale without giving a
        ``sigma``/``grid`` picks the defaults of the new scale.
        """
        new_scale = self.scale if scale is None else check_scale(scale)
        same_axis = new_scale == self.scale
        if sigma is None and same_axis:
            sigma = self.sigma
        if grid is None and same_axis and num_grid_points is None and sigma == self.sigma:
            grid = self.grid
        return SpectralDensityResult.from_quadrature(
            self.nodes,
            self.weights,
            self.probe_norms_sq,
            lanczos_steps=self.lanczos_steps,
            operator_size=self.operator_size,
            num_matvecs=self.num_matvecs,
            distribution=self.distribution,
            seed=self.seed,
            zero_tol=self.zero_tol,
            scale=new_scale,
            sigma=sigma,
            grid=grid,
            num_grid_points=self.grid.size if num_grid_points is None else num_grid_points,
            stop_reason=self.stop_reason,
        )

    def integral(self) -> float:
        """Trapezoidal integral of ``density`` over ``grid``."""
        d = self.density
        return float(np.sum(0.5 * (d[1:] + d[:-1]) * np.diff(self.grid)))

    def estimate_trace_of(self, f: Callable[[np.ndarray], np.ndarray]) -> TraceResult:
        r"""``tr(f(A))`` from the stored quadrature, with a standard error over runs.

        Run ``r`` estimates ``v_r^T f(A) v_r ~ ||v_r||^2 sum_j tau_{rj} f(theta_{rj})``
        (Gauss quadrature, exact for polynomials ``f`` of degree ``< 2 m``; Ubaru, Chen &
        Saad 2017); the estimate is the mean over runs and ``stderr`` the sample standard
        deviation over runs divided by ``sqrt(R)``. The stderr covers the probe
        randomness only, not the quadrature error of a non-polynomial ``f`` (which decays
        fast in the number of Lanczos steps for smooth ``f`` on the spectrum).

        Args:
            f: Vectorised function of a float64 NumPy array (e.g. ``np.log`` for the
                log-determinant of a positive definite ``A``).

        Returns:
            A :class:`TraceResult` with ``method="slq"`` and no new matvecs counted
            beyond the ones that built this result.
        """
        return _quadrature_trace(
            self.nodes,
            self.weights,
            self.probe_norms_sq,
            f,
            self.num_matvecs,
            self.operator_size,
            self.distribution,
            self.seed,
        )

    def plot(
        self,
        ax: Axes | None = None,
        *,
        scale: str | None = None,
        mark_eigenvalues: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        yscale: str = "log",
        **line_kwargs: Any,
    ) -> Axes:
        """Plot the density with matplotlib (requires the ``plot`` extra).

        Args:
            ax: Axes to draw on; default a new figure.
            scale: Re-smooth on this scale first (``"linear"`` / ``"log"``).
            mark_eigenvalues: Eigenvalues (e.g. from ``lanczos``) drawn as vertical lines.
            yscale: ``"log"`` (default: outliers carry little mass) or ``"linear"``.
            **line_kwargs: Passed to ``ax.plot``.

        Returns:
            The axes.
        """
        from hessian_eigenthings.plotting import plot_spectral_density

        return plot_spectral_density(
            self,
            ax,
            scale=scale,
            mark_eigenvalues=mark_eigenvalues,
            yscale=yscale,
            **line_kwargs,
        )

    def __repr__(self) -> str:
        return (
            f"SpectralDensityResult(num_runs={self.num_runs}, lanczos_steps="
            f"{self.lanczos_steps}, scale={self.scale!r}, sigma={self.sigma:.3g}, "
            f"grid=[{self.grid[0]:.4g}, {self.grid[-1]:.4g}] x {self.grid.size}, "
            f"trace={self.trace.estimate:.6g} +- {self.trace.stderr:.3g}, masses "
            f"(negative, zero, positive)=({self.negative_mass:.3f}, {self.zero_mass:.3f}, "
            f"{self.positive_mass:.3f}) at zero_tol={self.zero_tol:.3g})"
        )

    def _repr_html_(self) -> str:
        summary = [
            ("runs x Lanczos steps", f"{self.num_runs} x {self.lanczos_steps}"),
            ("trace", f"{self.trace.estimate:.8g} ± {self.trace.stderr:.3g} (stderr)"),
            (
                "Ritz values",
                f"[{min(float(n.min()) for n in self.nodes):.6g}, "
                f"{max(float(n.max()) for n in self.nodes):.6g}]",
            ),
            ("negative mass", f"{self.negative_mass:.3g}"),
            ("scale, sigma", f"{self.scale}, {self.sigma:.3g}"),
            ("grid", f"[{self.grid[0]:.4g}, {self.grid[-1]:.4g}] x {self.grid.size}"),
            ("integral of density", f"{self.integral():.4f}"),
            ("matvecs", str(self.num_matvecs)),
            ("n", str(self.operator_size)),
            ("seed", str(self.seed)),
        ]
        return html_table("SpectralDensityResult (plot it with .plot())", summary)

    # -- 1.0.0a5 attribute names -----------------------------------------------------------
    @property
    def raw_eigenvalues(self) -> torch.Tensor:
        """``(num_runs, m)`` float64 Ritz values per run, NaN-padded (1.0.0a5; use ``nodes``)."""
        deprecated("SpectralDensityResult.raw_eigenvalues", "SpectralDensityResult.nodes")
        return _padded(self.nodes, math.nan)

    @property
    def raw_weights(self) -> torch.Tensor:
        """``(num_runs, m)`` float64 quadrature weights, 0-padded (1.0.0a5; use ``weights``)."""
        deprecated("SpectralDensityResult.raw_weights", "SpectralDensityResult.weights")
        return _padded(self.weights, 0.0)


def _padded(rows: Sequence[np.ndarray], fill: float) -> torch.Tensor:
    """Per-run arrays as one ``(runs, max length)`` float64 tensor padded with ``fill``."""
    width = max(r.size for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, : r.size] = torch.from_numpy(np.asarray(r, dtype=np.float64))
    return out


def _quadrature_masses(
    nodes: Sequence[np.ndarray], weights: Sequence[np.ndarray], zero_tol: float
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Negative, zero and positive masses of the quadrature and their standard errors.

    Per run the weights of the nodes ``< -zero_tol``, ``<= zero_tol`` in magnitude and
    ``> zero_tol``; the masses are the means over runs, the errors ``std / sqrt(R)``.
    """
    per_run = np.array(
        [
            [
                float(np.sum(w[t < -zero_tol])),
                float(np.sum(w[np.abs(t) <= zero_tol])),
                float(np.sum(w[t > zero_tol])),
            ]
            for t, w in zip(nodes, weights)
        ],
        dtype=np.float64,
    )
    columns = [_mean_stderr(per_run[:, i]) for i in range(3)]
    means = (columns[0][0], columns[1][0], columns[2][0])
    return means, (columns[0][1], columns[1][1], columns[2][1])


def _quadrature_trace(
    nodes: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    probe_norms_sq: np.ndarray,
    f: Callable[[np.ndarray], np.ndarray],
    num_matvecs: int,
    operator_size: int,
    distribution: str,
    seed: int | None,
) -> TraceResult:
    per_run = np.array(
        [
            probe_norms_sq[r] * float(np.sum(weights[r] * np.asarray(f(nodes[r]), dtype=float)))
            for r in range(len(nodes))
        ],
        dtype=np.float64,
    )
    estimate, stderr = _mean_stderr(per_run)
    return TraceResult(
        estimate=estimate,
        stderr=stderr,
        num_matvecs=num_matvecs,
        operator_size=operator_size,
        method="slq",
        distribution=distribution,
        seed=seed,
        samples=per_run,
        details={"num_runs": len(nodes), "dof": len(nodes) - 1},
    )

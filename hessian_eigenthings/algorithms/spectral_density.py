r"""Spectral density by Stochastic Lanczos Quadrature (SLQ).

References: S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via Stochastic
Lanczos Quadrature", SIAM J. Matrix Anal. Appl. 38(4), 2017; B. Ghorbani, S. Krishnan,
Y. Xiao, "An investigation into neural net optimization via Hessian eigenvalue density",
ICML 2019 (SLQ for neural-network Hessians); V. Papyan, "Traces of class/cross-class
structure pervade deep learning spectra", JMLR 2020 (log-scale spectra).

The empirical spectral measure of ``A = sum_i lambda_i u_i u_i^T`` is
``mu = (1/n) sum_i delta_{lambda_i}``. For a probe ``v`` with ``E[v v^T] = I``,
``mu_v = sum_i (v^T u_i)^2 / ||v||^2 delta_{lambda_i}`` is a random probability measure
whose expectation is ``mu`` (for Rademacher probes ``||v||^2 = n`` and
``E[(v^T u_i)^2] = 1``; for Gaussian probes by rotation invariance).
``m`` Lanczos steps from ``v`` give ``T_m = V diag(theta) V^T``; the Gauss quadrature rule
with nodes ``theta_j`` (Ritz values) and weights ``tau_j = V_{1j}^2`` matches the first
``2m`` moments of ``mu_v`` (Golub & Meurant). Averaging the rules of ``R`` independent
probes and smoothing with a normalised Gaussian kernel gives the density

.. math::

    \phi_\sigma(t) = \frac{1}{R} \sum_{r=1}^R \sum_{j=1}^m \tau_{rj}
    \frac{1}{\sigma\sqrt{2\pi}} e^{-(t - \theta_{rj})^2 / (2\sigma^2)},
    \qquad \int \phi_\sigma = 1.

The same rules estimate ``tr(f(A)) ~ (1/R) sum_r ||v_r||^2 sum_j tau_{rj} f(theta_{rj})``
(:meth:`SpectralDensityResult.estimate_trace_of`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from typing_extensions import Unpack

from hessian_eigenthings._compat import legacy_keywords, spectral_density_grid_padding
from hessian_eigenthings.algorithms._density_smoothing import check_scale
from hessian_eigenthings.algorithms._precision import default_vector_dtype, eps
from hessian_eigenthings.algorithms._records import StopReason
from hessian_eigenthings.algorithms._run import (
    LongRunOptions,
    ResumableRun,
    drive,
    long_run_options,
)
from hessian_eigenthings.algorithms._validation import (
    DISTRIBUTIONS,
    check_choice,
    check_int,
    check_operator,
    resolve_seed,
)
from hessian_eigenthings.algorithms.estimator_results import SpectralDensityResult
from hessian_eigenthings.algorithms.lanczos_tridiagonal import tridiagonalize
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["default_zero_tol", "spectral_density"]

# Below this many unit roundoffs of the operator's dtype (times max|theta|) a Ritz value
# is rounding noise: the precision floor of the default zero_tol (as default_tol's 4 eps).
_ZERO_TOL_ROUNDOFFS = 4.0


def default_zero_tol(
    nodes: Sequence[np.ndarray], lanczos_steps: int, operator_dtype: torch.dtype
) -> float:
    r"""The zero threshold of an SLQ run: its resolution at 0, or its precision floor.

    Resolution: the nodes of ``m``-point Gauss rules of measures on ``[a, b]`` follow the
    arcsine (Chebyshev) distribution of the interval as ``m`` grows (the zeros of
    orthogonal polynomials; Saff & Totik, *Logarithmic Potentials with External Fields*,
    1997), so two eigenvalues closer than the local spacing of ``m`` Chebyshev points,

    .. math::  x_i = rac{a + b}{2} + rac{b - a}{2}\cosrac{(2i - 1)\pi}{2m},

    are not told apart: about ``(b - a) / m`` inside the spectrum, ``(b - a) \pi^2 / (2 m^2)``
    at its ends (where a PSD operator's zero eigenvalues sit). The threshold is that
    spacing at ``0``, with ``[a, b]`` the range of the nodes of all runs; it is raised to
    ``4 eps(operator dtype) * max|theta|``, below which Ritz values are rounding noise
    (a float32 operator with exact zero eigenvalues gives nodes of order
    ``eps * max|theta|`` of either sign).

    Args:
        nodes: Per-run Ritz values.
        lanczos_steps: Lanczos steps per run ``m`` (the requested number: a run that broke
            down early is exact, not coarser).
        operator_dtype: The operator's dtype.

    Returns:
        The threshold ``zero_tol`` (``>= 0``).
    """
    theta = np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1) for t in nodes])
    a, b = float(np.min(theta)), float(np.max(theta))
    floor = _ZERO_TOL_ROUNDOFFS * eps(operator_dtype) * max(abs(a), abs(b))
    m = int(lanczos_steps)
    if m < 2 or b <= a:
        return max(floor, b - a)
    angles = (2.0 * np.arange(1, m + 1) - 1.0) * np.pi / (2.0 * m)
    points = 0.5 * (a + b) + 0.5 * (b - a) * np.cos(angles)  # decreasing
    below = int(np.searchsorted(-points, 0.0))  # points[:below] > 0 >= points[below:]
    i = min(max(below, 1), m - 1)
    return max(floor, float(points[i - 1] - points[i]))


@legacy_keywords(translate=spectral_density_grid_padding)
def spectral_density(
    operator: CurvatureOperator,
    num_runs: int = 10,
    lanczos_steps: int = 80,
    *,
    grid: np.ndarray | Sequence[float] | None = None,
    num_grid_points: int = 1024,
    sigma: float | None = None,
    scale: str = "linear",
    distribution: str = "rademacher",
    zero_tol: float | None = None,
    reorthogonalize: bool = True,
    seed: int | None = None,
    backend: LinAlgBackend | None = None,
    **long_run: Unpack[LongRunOptions],
) -> SpectralDensityResult:
    """Estimate the eigenvalue density of ``A`` with Stochastic Lanczos Quadrature.

    Every run draws one probe on the operator's device and runs
    :func:`~hessian_eigenthings.algorithms.lanczos_tridiagonal.lanczos_tridiagonal` with
    full reorthogonalisation (no ghost eigenvalues); its tridiagonal matrix is
    diagonalised in float64. The per-run nodes and weights are kept, so
    :meth:`SpectralDensityResult.resmooth` changes ``sigma``, grid or scale without new
    products. Cost: ``num_runs * lanczos_steps`` products; memory ``O(lanczos_steps * n)``
    for one run's Lanczos basis.

    Scales: ``"linear"`` is a density in ``lambda`` that integrates to 1. ``"log"`` is a
    density in ``x = log10|lambda|`` for spectra spanning many orders of magnitude (Papyan
    2020): positive and negative eigenvalues are folded together by ``|lambda|``
    (``negative_density`` holds the negative part), and nodes with ``|theta| <=
    zero_tol`` carry no logarithm; their mass is ``zero_mass`` and the log density
    integrates to ``1 - zero_mass``.

    Masses: ``negative_mass``, ``zero_mass`` and ``positive_mass`` (below ``-zero_tol``,
    within ``+-zero_tol``, above it; the same on both scales) are read from the quadrature
    nodes and weights, with standard errors over the runs (``*_stderr``); see
    :class:`SpectralDensityResult`. The default ``zero_tol`` is the resolution of the
    run at 0 (:func:`default_zero_tol`: about ``span / m`` when 0 lies inside the
    spectrum, ``span * pi^2 / (2 m^2)`` at its end, never below ``4 eps * max|theta|`` of
    the operator's dtype), because nodes closer to 0 than that cannot be told from 0: a
    mass computed with a smaller ``zero_tol`` carries a quadrature error that the
    standard errors do not cover. More ``lanczos_steps`` resolve smaller eigenvalues.

    Accuracy: the quadrature matches ``2 m`` moments per probe, so the estimated measure
    is close to the true one in Wasserstein distance (``O(span / m)`` from the quadrature,
    ``O(1 / sqrt(R n))`` from the probes for the bulk); ``sigma`` should not be below the
    node spacing that ``m`` steps resolve, ``~ span / m``.

    Args:
        operator: Symmetric operator ``A``.
        num_runs: Number of probe vectors ``R``.
        lanczos_steps: Lanczos steps ``m`` per run (capped at ``n``).
        grid: Evaluation points on the axis of ``scale``; default ``num_grid_points``
            uniform points over the nodes' range extended by ``5 sigma`` on each side.
        num_grid_points: Size of the default grid.
        sigma: Gaussian kernel width on the axis of ``scale`` (decades for ``"log"``);
            default ``1/100`` of the span of the (transformed) nodes.
        scale: ``"linear"`` or ``"log"``.
        distribution: ``"rademacher"`` (default; ``||v||^2 = n`` exactly) or
            ``"gaussian"`` probes.
        zero_tol: Eigenvalues with ``|lambda| <= zero_tol`` count as zero (the masses,
            the log scale); default :func:`default_zero_tol` (see above).
        reorthogonalize: Full reorthogonalisation (default; ``O(lanczos_steps * n)``
            memory). ``False`` keeps three vectors (``O(n)`` memory): converged Ritz values
            then reappear as ghost copies that share their eigenvalue's weight, so the
            quadrature measure stays close to the true one (Lanczos quadrature is stable
            under loss of orthogonality; Greenbaum 1989, Knizhnerman 1996), but the
            individual nodes are no longer distinct eigenvalue estimates.
        seed: ``None`` draws a fresh seed (recorded in the result); an int reproduces.
            Under a distributed backend every rank uses rank 0's seed.
        backend: Vector arithmetic; default ``operator.backend``.
        **long_run: ``checkpoint``, ``checkpoint_every``, ``checkpoint_seconds``,
            ``time_limit`` (see :class:`~hessian_eigenthings.algorithms.LongRunOptions`).
            The checkpoint holds the completed runs' quadrature rules, written between
            runs; a time-limited call (with at least one run done) returns the density
            of the runs done so far (``num_runs`` says how many).

    Returns:
        A :class:`SpectralDensityResult`, including ``trace`` (``tr(A)`` with a standard
        error over runs; for ``f(x) = x`` each run's quadrature equals ``v^T A v``
        exactly, so this is Hutchinson's estimator with ``R`` probes).

    Raises:
        ValueError: Non-positive ``num_runs``/``lanczos_steps``, unknown ``scale`` or
            ``distribution``, bad ``sigma``/``grid``/``zero_tol``.
        NonFiniteError: A product was inf/nan; ``err.partial`` is the density of the
            runs completed before it (``None`` if none was).
        CheckpointMismatchError, CorruptCheckpointError: ``checkpoint`` cannot be used.

    Example:
        >>> from hessian_eigenthings import LambdaOperator
        >>> A = torch.diag(torch.cat([torch.zeros(50), torch.ones(50)]).double())
        >>> op = LambdaOperator(lambda v: A @ v, 100, dtype=torch.float64)
        >>> res = spectral_density(op, num_runs=4, lanczos_steps=10, seed=0)
        >>> round(res.integral(), 6)
        1.0
    """
    operator = check_operator(operator, "spectral_density")
    num_runs = check_int(num_runs, "num_runs")
    lanczos_steps = check_int(lanczos_steps, "lanczos_steps")
    scale = check_scale(scale)
    distribution = check_choice(distribution, DISTRIBUTIONS, "probe distribution")
    if zero_tol is not None and not (isinstance(zero_tol, (int, float)) and zero_tol >= 0):
        raise ValueError(f"zero_tol must be None or a number >= 0, got {zero_tol!r}.")
    options = long_run_options("spectral_density", long_run)
    backend = backend if backend is not None else operator.backend
    run = _SLQ(
        operator,
        backend,
        ResumableRun.agree_seed(resolve_seed(seed), backend),
        num_runs=num_runs,
        lanczos_steps=lanczos_steps,
        distribution=distribution,
        reorthogonalize=reorthogonalize,
        zero_tol=zero_tol,
        smoothing={
            "scale": scale,
            "sigma": sigma,
            "grid": grid,
            "num_grid_points": num_grid_points,
        },
    )
    config = {"num_runs": num_runs, "lanczos_steps": lanczos_steps, "distribution": distribution}
    return drive(
        run,
        {**config, "reorthogonalize": reorthogonalize, "seed": seed, "vector_dtype": run.dtype},
        options,
    )


class _SLQ(ResumableRun[SpectralDensityResult]):
    """``num_runs`` Lanczos runs from random probes; a step is one whole run."""

    algorithm = "spectral_density"

    def __init__(
        self,
        operator: CurvatureOperator,
        backend: LinAlgBackend,
        seed: int,
        *,
        num_runs: int,
        lanczos_steps: int,
        distribution: str,
        reorthogonalize: bool,
        zero_tol: float | None,
        smoothing: dict[str, Any],
    ) -> None:
        super().__init__(operator, backend, seed)
        self.num_runs, self.lanczos_steps = num_runs, lanczos_steps
        self.distribution, self.reorthogonalize = distribution, reorthogonalize
        self.zero_tol, self.smoothing = zero_tol, smoothing
        self.dtype = default_vector_dtype(operator.dtype)
        self.nodes: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.norms_sq: list[torch.Tensor] = []
        self.num_matvecs = 0  # products of the completed runs

    def used(self) -> int:
        return self.num_matvecs

    def done(self) -> bool:
        return len(self.nodes) >= self.num_runs

    def context(self) -> str:
        return f" (during run {len(self.nodes) + 1} of {self.num_runs})"

    def step(self) -> None:
        v = self.backend.random(
            self.op.size,
            generator=self.gen,
            dtype=self.dtype,
            device=self.op.device,
            distribution=self.distribution,
        )
        norm_sq = self.backend.dot(v, v).to(torch.float64).cpu()
        tri = tridiagonalize(
            lambda q: self.apply(q, check=False),
            self.backend,
            v,
            min(self.lanczos_steps, self.op.size),
            self.reorthogonalize,
        )
        T = tri.matrix().cpu()
        if not bool(torch.isfinite(T).all()):
            bad_alpha = (~torch.isfinite(tri.alphas.cpu())).nonzero()
            j = int(bad_alpha[0, 0]) if bad_alpha.numel() > 0 else 0
            self.fail(self.num_matvecs + j + 1)
        self.num_matvecs += tri.num_matvecs
        theta, vecs = torch.linalg.eigh(T)
        self.nodes.append(theta.numpy())
        self.weights.append((vecs[0] ** 2).numpy())
        self.norms_sq.append(norm_sq)

    def partial(self, stop_reason: StopReason) -> SpectralDensityResult | None:
        return self._density(stop_reason) if self.nodes else None

    def result(self) -> SpectralDensityResult:
        return self._density("completed")

    def _density(self, stop_reason: StopReason) -> SpectralDensityResult:
        tol = self.zero_tol
        if tol is None:
            steps = min(self.lanczos_steps, self.op.size)
            tol = default_zero_tol(self.nodes, steps, self.op.dtype)
        return SpectralDensityResult.from_quadrature(
            self.nodes,
            self.weights,
            torch.stack(self.norms_sq).numpy(),
            lanczos_steps=self.lanczos_steps,
            operator_size=self.op.size,
            num_matvecs=self.num_matvecs,
            distribution=self.distribution,
            seed=self.seed,
            zero_tol=float(tol),
            stop_reason=stop_reason,
            **self.smoothing,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "nodes": [torch.from_numpy(t) for t in self.nodes],
            "weights": [torch.from_numpy(t) for t in self.weights],
            "norms_sq": self.norms_sq,
            "num_matvecs": self.num_matvecs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nodes = [t.numpy() for t in state["nodes"]]
        self.weights = [t.numpy() for t in state["weights"]]
        self.norms_sq = list(state["norms_sq"])
        self.num_matvecs = int(state["num_matvecs"])

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

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hessian_eigenthings._compat import legacy_keywords, spectral_density_grid_padding
from hessian_eigenthings.algorithms._deadline import Deadline
from hessian_eigenthings.algorithms._density_smoothing import check_scale
from hessian_eigenthings.algorithms._estimator_utils import (
    agree_seed,
    check_distribution,
    check_operator,
    resolve_seed,
    working_dtype,
)
from hessian_eigenthings.algorithms.checkpoint import (
    Checkpointer,
    generator_state,
    restore_generator,
)
from hessian_eigenthings.algorithms.estimator_results import SpectralDensityResult
from hessian_eigenthings.algorithms.lanczos_tridiagonal import lanczos_tridiagonal
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.errors import NonFiniteError
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["spectral_density"]

# On the log scale, |theta| <= this factor * eps(vector dtype) * max|theta| counts as 0.
_ZERO_TOL_FACTOR = 100.0


def _positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


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
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    time_limit: float | None = None,
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
    zero_tol`` (default ``100 * eps * max|theta|`` of the vector dtype, below which Ritz
    values are rounding noise) carry no logarithm; their mass is reported as
    ``zero_mass`` and the log density integrates to ``1 - zero_mass``.

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
        zero_tol: Threshold for zero eigenvalues on the log scale (see above).
        reorthogonalize: Full reorthogonalisation (default; ``O(lanczos_steps * n)``
            memory). ``False`` keeps three vectors (``O(n)`` memory): converged Ritz values
            then reappear as ghost copies that share their eigenvalue's weight, so the
            quadrature measure stays close to the true one (Lanczos quadrature is stable
            under loss of orthogonality; Greenbaum 1989, Knizhnerman 1996), but the
            individual nodes are no longer distinct eigenvalue estimates.
        seed: ``None`` draws a fresh seed (recorded in the result); an int reproduces.
            Under a distributed backend every rank uses rank 0's seed.
        backend: Vector arithmetic; default ``operator.backend``.
        checkpoint: Path of a checkpoint file (see
            :mod:`~hessian_eigenthings.algorithms.checkpoint`): the completed runs'
            quadrature rules and the generator state are saved between runs, and a call
            with the same arguments resumes from it (bit for bit the same result). Deleted
            when all runs are done; kept when ``time_limit`` stops the call.
        checkpoint_every: Write every this many products (rounded up to whole runs).
        checkpoint_seconds: Write when this many seconds passed since the last write
            (default 300 when neither interval is given).
        time_limit: Wall-clock seconds, checked between runs; when passed (and at least
            one run is done), the density of the runs done so far is returned with
            ``stop_reason="time_limit"`` (``num_runs`` says how many).

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
    num_runs = _positive_int(num_runs, "num_runs")
    lanczos_steps = _positive_int(lanczos_steps, "lanczos_steps")
    scale = check_scale(scale)
    distribution = check_distribution(distribution)
    if zero_tol is not None and not (isinstance(zero_tol, (int, float)) and zero_tol >= 0):
        raise ValueError(f"zero_tol must be None or a number >= 0, got {zero_tol!r}.")
    backend = backend if backend is not None else operator.backend
    seed_ = agree_seed(resolve_seed(seed), backend, operator.device)
    dtype = working_dtype(operator)
    deadline = Deadline(time_limit)
    checkpointer = Checkpointer.create(
        checkpoint,
        checkpoint_every,
        checkpoint_seconds,
        algorithm="spectral_density",
        operator=operator,
        backend=backend,
        config={
            "num_runs": num_runs,
            "lanczos_steps": lanczos_steps,
            "distribution": distribution,
            "reorthogonalize": reorthogonalize,
            "seed": seed,
            "vector_dtype": dtype,
        },
    )
    gen = backend.generator(seed_, operator.device)

    nodes: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    norms_sq: list[torch.Tensor] = []
    num_matvecs = 0
    if checkpointer is not None:
        saved = checkpointer.load()
        if saved is not None:
            nodes = [t.numpy() for t in saved["nodes"]]
            weights = [t.numpy() for t in saved["weights"]]
            norms_sq = list(saved["norms_sq"])
            num_matvecs = int(saved["num_matvecs"])
            seed_ = int(saved["seed"])
            restore_generator(gen, saved["generator"])

    def state() -> dict[str, Any]:
        return {
            "nodes": [torch.from_numpy(t) for t in nodes],
            "weights": [torch.from_numpy(t) for t in weights],
            "norms_sq": norms_sq,
            "num_matvecs": num_matvecs,
            "seed": seed_,
            "generator": generator_state(gen),
        }

    def result(stop_reason: str) -> SpectralDensityResult:
        tol = zero_tol
        if tol is None:
            max_abs = max(float(np.max(np.abs(t))) for t in nodes)
            tol = _ZERO_TOL_FACTOR * float(torch.finfo(dtype).eps) * max_abs
        return SpectralDensityResult.from_quadrature(
            nodes,
            weights,
            torch.stack(norms_sq).numpy(),
            lanczos_steps=lanczos_steps,
            operator_size=operator.size,
            num_matvecs=num_matvecs,
            distribution=distribution,
            seed=seed_,
            zero_tol=float(tol),
            scale=scale,
            sigma=sigma,
            grid=grid,
            num_grid_points=num_grid_points,
            stop_reason=stop_reason,
        )

    def non_finite(first_bad: int, cause: NonFiniteError | None) -> NonFiniteError:
        partial = result("non_finite") if nodes else None
        what = (
            f"Lanczos product {first_bad} of this SLQ run failed: {cause}"
            if cause is not None
            else f"{type(operator).__name__}.matvec returned non-finite values (inf/nan) at "
            f"product {first_bad} of this SLQ run"
        )
        return NonFiniteError(
            f"{what} (during run {len(nodes) + 1} of {num_runs}); err.partial holds the "
            f"density of the {len(nodes)} runs completed before it"
            + ("" if nodes else " (None: no run was completed)")
            + ". Check the model's loss and parameters for overflow or a bad batch.",
            partial=partial,
            matvec=first_bad,
            batch_index=None if cause is None else cause.batch_index,
            param_names=() if cause is None else cause.param_names,
        )

    stop_reason = "completed"
    runs_at_start = len(nodes)
    while len(nodes) < num_runs:
        # Checked only after this call completed a run (a resumed call always advances).
        if len(nodes) > runs_at_start and deadline.expired(operator.device):
            stop_reason = "time_limit"
            if checkpointer is not None:
                checkpointer.save(num_matvecs, state())
            break
        if checkpointer is not None:
            checkpointer.maybe_save(num_matvecs, state)
        v = backend.random(
            operator.size,
            generator=gen,
            dtype=dtype,
            device=operator.device,
            distribution=distribution,
        )
        norm_sq = backend.dot(v, v).to(torch.float64).cpu()
        try:
            tri = lanczos_tridiagonal(
                operator, v, lanczos_steps, reorthogonalize=reorthogonalize, backend=backend
            )
        except NonFiniteError as err:
            raise non_finite(num_matvecs + 1, err) from err
        T = tri.matrix().cpu()
        if not bool(torch.isfinite(T).all()):
            bad_alpha = (~torch.isfinite(tri.alphas.cpu())).nonzero()
            j = int(bad_alpha[0, 0]) if bad_alpha.numel() > 0 else 0
            raise non_finite(num_matvecs + j + 1, None)
        num_matvecs += tri.num_matvecs
        theta, vecs = torch.linalg.eigh(T)
        nodes.append(theta.numpy())
        weights.append((vecs[0] ** 2).numpy())
        norms_sq.append(norm_sq)

    out = result(stop_reason)
    if checkpointer is not None and stop_reason == "completed":
        checkpointer.finish()
    return out

r"""Hutch++: sketch, deflate, and run Hutchinson on the rest (Meyer, Musco, Musco, Woodruff 2021).

With a budget of ``m`` products, Hutch++ draws a sketch ``S`` of ``k = m // 3`` probes,
orthonormalises ``Y = A S = Q R``, and splits

.. math::

    \mathrm{tr}(A) = \mathrm{tr}(Q^\top A Q) + \mathrm{tr}\big((I - QQ^\top) A
    (I - QQ^\top)\big),

computing the first term exactly (``k`` products) and the second with Hutchinson's
estimator on ``l = m - 2k`` fresh probes ``g_j`` projected by ``P = I - QQ^T``:

.. math::

    \widehat{\mathrm{tr}}(A) = \mathrm{tr}(Q^\top A Q)
    + \frac{1}{l} \sum_{j=1}^{l} (P g_j)^\top A (P g_j).

For PSD ``A`` this reaches relative error ``eps`` with ``O(1/eps)`` products instead of
Hutchinson's ``O(1/eps^2)``: the sketch captures the large eigenvalues, whose
contribution to the Hutchinson variance dominates.
"""

from __future__ import annotations

import math

import torch

from hessian_eigenthings.algorithms._estimator_utils import (
    apply_columns,
    check_block_size,
    check_distribution,
    check_num_matvecs,
    check_operator,
    check_single_device,
    check_sketch_options,
    draw_columns,
    paired_dots,
    resolve_seed,
    working_dtype,
)
from hessian_eigenthings.algorithms.estimator_results import TraceResult
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["MIN_MATVECS_HUTCH_PLUS_PLUS", "hutch_plus_plus"]

# One sketch vector, its product with Q, and two residual probes for a standard error.
MIN_MATVECS_HUTCH_PLUS_PLUS = 4


def hutch_plus_plus(
    operator: CurvatureOperator,
    num_matvecs: int = 100,
    *,
    distribution: str = "rademacher",
    seed: int | None = None,
    max_sketch_size: int | None = None,
    sketch_device: torch.device | str | None = None,
    block_size: int = 32,
    backend: LinAlgBackend | None = None,
) -> TraceResult:
    """Estimate ``tr(A)`` with Hutch++ and an honest standard error.

    What the error bar covers: given the sketch ``Q``, the first term is exact and the
    second is a mean of ``l`` i.i.d. quadratic forms (the residual probes are independent
    of ``Q``) whose expectation is ``tr(P A P)``. So the estimate is unbiased conditional
    on the sketch, and ``stderr = std(residual forms, ddof=1) / sqrt(l)`` is the usual
    standard error of that mean: it covers exactly the randomness that remains once the
    sketch is drawn (the variance of the Hutchinson part on the deflated residual). The
    sketch itself introduces no bias, so the interval is honest for ``tr(A)``. With few
    residual probes the standard error is itself noisy: use Student-t quantiles with
    ``details["dof"] = l - 1`` degrees of freedom (at ``m = 10``, ``l = 4``, the 3-sigma
    interval covers ~94%, not 99.7%).

    On a flat part of the spectrum (e.g. a bulk of equal eigenvalues) the deflated
    residual ``P A P`` is close to the projector ``P``, whose Rademacher-Hutchinson
    variance grows with ``k``; Hutch++'s error then stops improving with ``m`` while
    XTrace's keeps falling (see ``docs/benchmarks/estimators.md``).

    Budget split: ``k = min(m // 3, max_sketch_size, n)`` sketch vectors, ``k`` products
    with ``Q``, and the remaining ``l = m - 2k`` products on residual probes (a cap on the
    sketch moves budget to the residual probes).

    Memory: the sketch ``Y`` / ``Q`` holds ``n * k`` numbers (``O(n m)``; with ``m = 300``
    and ``n = 10^8`` float32 parameters that is 40 GB), plus one block of
    ``block_size`` probes. Bound it with ``max_sketch_size`` and/or keep the sketch on
    another device with ``sketch_device="cpu"`` (each block is moved to the operator's
    device for its product).

    Args:
        operator: Symmetric operator ``A`` (PSD for the ``O(1/eps)`` guarantee; any
            symmetric ``A`` gives an unbiased estimate).
        num_matvecs: Total operator products ``m`` (at least 4).
        distribution: ``"rademacher"`` (default) or ``"gaussian"`` probes.
        seed: ``None`` draws a fresh seed (recorded in the result); an int reproduces.
        max_sketch_size: Upper bound on ``k``.
        sketch_device: Device that holds the sketch; default the operator's device.
        block_size: Probes per ``operator.matmat`` call.
        backend: Vector arithmetic; default ``operator.backend`` (whole vectors needed).

    Returns:
        A :class:`TraceResult`; ``samples`` are the ``l`` residual quadratic forms and
        ``details`` holds ``sketch_size``, ``residual_probes`` and ``low_rank_trace``.
    """
    operator = check_operator(operator, "hutch_plus_plus")
    m = check_num_matvecs(num_matvecs, MIN_MATVECS_HUTCH_PLUS_PLUS, "hutch++")
    distribution = check_distribution(distribution)
    block_size = check_block_size(block_size)
    cap, store = check_sketch_options(max_sketch_size, sketch_device, operator)
    seed = resolve_seed(seed)
    backend = backend if backend is not None else operator.backend
    check_single_device(backend, operator, "hutch_plus_plus")
    dtype = working_dtype(operator)
    n = operator.size
    gen = backend.generator(seed, operator.device)

    k = min(m // 3, n if cap is None else min(cap, n))
    num_resid = m - 2 * k

    def draw(num: int) -> torch.Tensor:
        return draw_columns(
            backend, operator, num, generator=gen, dtype=dtype, distribution=distribution
        )

    # Sketch: Y = A S, orthonormal basis Q of its range (Householder QR, working dtype).
    Y = apply_columns(operator, draw(k).to(store), block_size)
    Q, _ = torch.linalg.qr(Y)
    del Y
    low_rank = torch.zeros((), dtype=torch.float64, device=store)
    for start in range(0, k, block_size):
        Qb = Q[:, start : start + block_size]
        AQb = operator.matmat(Qb.to(operator.device)).to(store)
        low_rank = low_rank + paired_dots(backend, n, Qb, AQb).sum()

    # Hutchinson on the deflated residual P A P with fresh probes.
    forms = torch.empty(num_resid, dtype=torch.float64, device=store)
    for start in range(0, num_resid, block_size):
        b = min(block_size, num_resid - start)
        G = draw(b).to(store)
        G = G - Q @ (Q.T @ G)
        G = G - Q @ (Q.T @ G)  # second pass: P G orthogonal to Q to working precision
        AG = operator.matmat(G.to(operator.device)).to(store)
        forms[start : start + b] = paired_dots(backend, n, G, AG)

    samples = forms.cpu().numpy()
    low = float(low_rank)
    estimate = low + float(samples.mean())
    stderr = float(samples.std(ddof=1) / math.sqrt(num_resid))
    return TraceResult(
        estimate=estimate,
        stderr=stderr,
        num_matvecs=2 * k + num_resid,
        operator_size=n,
        method="hutch++",
        distribution=distribution,
        seed=seed,
        samples=samples,
        details={
            "sketch_size": k,
            "residual_probes": num_resid,
            "low_rank_trace": low,
            "dof": num_resid - 1,
        },
    )

r"""Hutchinson's trace estimator (Hutchinson 1989; Girard 1989).

For probes ``omega_1..omega_m`` with ``E[omega omega^T] = I`` (Rademacher or standard
Gaussian entries),

.. math::

    \widehat{\mathrm{tr}}(A) = \frac{1}{m} \sum_{k=1}^m \omega_k^\top A \omega_k,
    \qquad \mathrm{se} = \frac{s_m}{\sqrt{m}},

where ``s_m`` is the sample standard deviation (``ddof=1``) of the ``m`` quadratic
forms. The estimate is unbiased. Its variance is ``2 (||A||_F^2 - sum_i A_ii^2) / m``
for Rademacher probes and ``2 ||A||_F^2 / m`` for Gaussian ones, so the relative error
decays like ``1 / sqrt(m)`` (Avron & Toledo 2011).
"""

from __future__ import annotations

import math

import torch

from hessian_eigenthings.algorithms._estimator_utils import (
    check_block_size,
    check_distribution,
    check_num_matvecs,
    check_operator,
    draw_columns,
    paired_dots,
    resolve_seed,
    working_dtype,
)
from hessian_eigenthings.algorithms.estimator_results import TraceResult
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["MIN_MATVECS_HUTCHINSON", "hutchinson"]

# Two quadratic forms are the fewest that give a sample standard deviation.
MIN_MATVECS_HUTCHINSON = 2


def hutchinson(
    operator: CurvatureOperator,
    num_matvecs: int = 100,
    *,
    distribution: str = "rademacher",
    seed: int | None = None,
    block_size: int = 32,
    backend: LinAlgBackend | None = None,
) -> TraceResult:
    """Estimate ``tr(A)`` with Hutchinson's estimator and its standard error.

    What the error bar covers: the ``m`` quadratic forms are i.i.d. with mean ``tr(A)``,
    so ``stderr`` estimates the standard deviation of the estimate itself; by the central
    limit theorem ``estimate +- 3 stderr`` covers ``tr(A)`` with probability close to
    99.7% once ``m`` is more than a few tens. For few probes use Student-t quantiles with
    ``details["dof"] = m - 1`` degrees of freedom instead of 3.

    Memory: one block of ``block_size`` probes and their products, ``O(n * block_size)``.
    The probes are drawn on the operator's device; the only host synchronisation is the
    final transfer of the ``m`` quadratic forms.

    Args:
        operator: Symmetric operator ``A``.
        num_matvecs: Number of probes ``m`` (= operator products), at least 2.
        distribution: ``"rademacher"`` (default, lower variance) or ``"gaussian"``.
        seed: ``None`` draws a fresh seed (recorded in the result); an int reproduces.
        block_size: Probes per ``operator.matmat`` call.
        backend: Vector arithmetic; default ``operator.backend``.

    Returns:
        A :class:`TraceResult` whose ``samples`` are the ``m`` quadratic forms.

    Example:
        >>> from hessian_eigenthings import LambdaOperator
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> op = LambdaOperator(lambda v: A @ v, 100, dtype=torch.float64)
        >>> hutchinson(op, 10, seed=0).estimate  # diagonal A: exact with Rademacher probes
        5050.0
    """
    operator = check_operator(operator, "hutchinson")
    m = check_num_matvecs(num_matvecs, MIN_MATVECS_HUTCHINSON, "hutchinson")
    distribution = check_distribution(distribution)
    block_size = check_block_size(block_size)
    seed = resolve_seed(seed)
    backend = backend if backend is not None else operator.backend
    dtype = working_dtype(operator)
    gen = backend.generator(seed, operator.device)

    forms = torch.empty(m, dtype=torch.float64, device=operator.device)
    for start in range(0, m, block_size):
        b = min(block_size, m - start)
        omega = draw_columns(
            backend, operator, b, generator=gen, dtype=dtype, distribution=distribution
        )
        forms[start : start + b] = paired_dots(
            backend, operator.size, omega, operator.matmat(omega)
        )
    samples = forms.cpu().numpy()
    estimate = float(samples.mean())
    stderr = float(samples.std(ddof=1) / math.sqrt(m))
    return TraceResult(
        estimate=estimate,
        stderr=stderr,
        num_matvecs=m,
        operator_size=operator.size,
        method="hutchinson",
        distribution=distribution,
        seed=seed,
        samples=samples,
        details={"num_probes": m, "dof": m - 1},
    )

"""``trace``: one entry point for the stochastic trace estimators.

==============  ==============================================  ==========================
method          algorithm                                       memory
==============  ==============================================  ==========================
``hutchinson``  i.i.d. quadratic forms (Hutchinson 1989)        ``O(n * block_size)``
``hutch++``     sketch + Hutchinson on the deflated residual    ``O(n * m / 3)``
                (Meyer, Musco, Musco & Woodruff 2021)
``xtrace``      exchangeable leave-one-out sketch estimator     ``O(n * m / 2)``
                (Epperly, Tropp & Webber 2024)
==============  ==============================================  ==========================

For PSD curvature (GGN, Fisher, Hessians near a minimum) with a few large eigenvalues,
Hutch++ and XTrace are far more accurate than Hutchinson at the same budget (see
``docs/benchmarks/estimators.md``); Hutchinson needs the least memory and works with
sharded operators.
"""

from __future__ import annotations

import torch
from typing_extensions import Unpack

from hessian_eigenthings.algorithms._run import LongRunOptions
from hessian_eigenthings.algorithms._validation import check_choice
from hessian_eigenthings.algorithms.estimator_results import TraceResult
from hessian_eigenthings.algorithms.hutch_plus_plus import hutch_plus_plus
from hessian_eigenthings.algorithms.hutchinson import hutchinson
from hessian_eigenthings.algorithms.xtrace import xtrace
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["TRACE_METHODS", "trace"]

TRACE_METHODS = ("hutch++", "hutchinson", "xtrace")
_DEFAULT_DISTRIBUTION = {"hutch++": "rademacher", "hutchinson": "rademacher", "xtrace": "gaussian"}


def trace(
    operator: CurvatureOperator,
    num_matvecs: int = 100,
    *,
    method: str = "hutch++",
    distribution: str | None = None,
    seed: int | None = None,
    max_sketch_size: int | None = None,
    sketch_device: torch.device | str | None = None,
    block_size: int = 32,
    backend: LinAlgBackend | None = None,
    **long_run: Unpack[LongRunOptions],
) -> TraceResult:
    """Estimate ``tr(A)`` with a standard error, using ``num_matvecs`` operator products.

    Args:
        operator: Symmetric operator ``A``.
        num_matvecs: Budget of operator products (minimum 2 for ``"hutchinson"``, 4 for
            ``"hutch++"`` and ``"xtrace"``).
        method: ``"hutch++"`` (default), ``"hutchinson"`` or ``"xtrace"``.
        distribution: ``"rademacher"`` or ``"gaussian"``; default ``"rademacher"`` for
            Hutchinson and Hutch++, ``"gaussian"`` (sphere-normalised, the paper's
            improved variant) for XTrace.
        seed: ``None`` draws a fresh seed (recorded in the result); an int reproduces.
        max_sketch_size: Cap on the sketch of Hutch++ / XTrace (bounds memory); ignored
            by Hutchinson, which holds no sketch.
        sketch_device: Device that holds the Hutch++ / XTrace sketch (e.g. ``"cpu"``).
        block_size: Probes per ``operator.matmat`` call.
        backend: Vector arithmetic; default ``operator.backend``.
        **long_run: ``checkpoint``, ``checkpoint_every``, ``checkpoint_seconds``,
            ``time_limit`` (see :class:`~hessian_eigenthings.algorithms.LongRunOptions`);
            what a checkpoint holds and what a time-limited call returns is described by
            the method's function.

    Returns:
        A :class:`TraceResult`.

    Raises:
        ValueError: Unknown ``method`` or ``distribution``, or ``num_matvecs`` below the
            method's minimum.
        NonFiniteError: A product was inf/nan (``err.partial``: the partial estimate).

    Example:
        >>> from hessian_eigenthings import LambdaOperator
        >>> A = torch.diag(torch.linspace(1.0, 2.0, 50, dtype=torch.float64))
        >>> op = LambdaOperator(lambda v: A @ v, 50, dtype=torch.float64,
        ...                     matmat_fn=lambda V: A @ V)
        >>> res = trace(op, 60, method="xtrace", seed=0)
        >>> abs(res.estimate - 75.0) < 4 * res.stderr + 1e-9
        True
    """
    method = check_choice(method, TRACE_METHODS, "trace method")
    dist = _DEFAULT_DISTRIBUTION[method] if distribution is None else distribution
    if method == "hutchinson":
        return hutchinson(
            operator,
            num_matvecs,
            distribution=dist,
            seed=seed,
            block_size=block_size,
            backend=backend,
            **long_run,
        )
    sketched = hutch_plus_plus if method == "hutch++" else xtrace
    return sketched(
        operator,
        num_matvecs,
        distribution=dist,
        seed=seed,
        max_sketch_size=max_sketch_size,
        sketch_device=sketch_device,
        block_size=block_size,
        backend=backend,
        **long_run,
    )

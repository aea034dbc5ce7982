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

from typing import Any

import torch
from typing_extensions import Unpack

from hessian_eigenthings._compat import legacy_keywords
from hessian_eigenthings.algorithms._calls import ProbeCall
from hessian_eigenthings.algorithms._records import StopReason
from hessian_eigenthings.algorithms._run import LongRunOptions, drive, first_non_finite
from hessian_eigenthings.algorithms._sketch import ProbeSweep, TraceRun, paired_dots
from hessian_eigenthings.algorithms.estimator_results import TraceResult
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["MIN_MATVECS_HUTCHINSON", "hutchinson"]

# Two quadratic forms are the fewest that give a sample standard deviation.
MIN_MATVECS_HUTCHINSON = 2


@legacy_keywords({"num_samples": "num_matvecs"})
def hutchinson(
    operator: CurvatureOperator,
    num_matvecs: int = 100,
    *,
    distribution: str = "rademacher",
    seed: int | None = None,
    block_size: int = 32,
    backend: LinAlgBackend | None = None,
    **long_run: Unpack[LongRunOptions],
) -> TraceResult:
    """Estimate ``tr(A)`` with Hutchinson's estimator and its standard error.

    What the error bar covers: the ``m`` quadratic forms are i.i.d. with mean ``tr(A)``,
    so ``stderr`` estimates the standard deviation of the estimate itself; by the central
    limit theorem ``estimate +- 3 stderr`` covers ``tr(A)`` with probability close to
    99.7% once ``m`` is more than a few tens. For few probes use Student-t quantiles with
    ``details["dof"] = m - 1`` degrees of freedom instead of 3.

    Memory: one block of ``block_size`` probes and their products, ``O(n * block_size)``.
    The probes are drawn on the operator's device; the host synchronises once per block
    (a finiteness check of the block's quadratic forms).

    Args:
        operator: Symmetric operator ``A``.
        num_matvecs: Number of probes ``m`` (= operator products), at least 2.
        distribution: ``"rademacher"`` (default, lower variance) or ``"gaussian"``.
        seed: ``None`` draws a fresh seed (recorded in the result); an int reproduces.
        block_size: Probes per ``operator.matmat`` call.
        backend: Vector arithmetic; default ``operator.backend``.
        **long_run: ``checkpoint``, ``checkpoint_every``, ``checkpoint_seconds``,
            ``time_limit`` (see :class:`~hessian_eigenthings.algorithms.LongRunOptions`).
            The checkpoint holds the quadratic forms so far, written between blocks; a
            time-limited call returns the estimate of the forms made (at least 2).

    Returns:
        A :class:`TraceResult` whose ``samples`` are the ``m`` quadratic forms.

    Raises:
        NonFiniteError: A product was inf/nan; ``err.partial`` is the estimate from the
            forms before the first bad one (``None`` with fewer than 2).

    Example:
        >>> from hessian_eigenthings import LambdaOperator
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> op = LambdaOperator(lambda v: A @ v, 100, dtype=torch.float64)
        >>> hutchinson(op, 10, seed=0).estimate  # diagonal A: exact with Rademacher probes
        5050.0
    """
    probes = (distribution, seed, block_size, backend)
    call = ProbeCall.check(
        "hutchinson", "hutchinson", MIN_MATVECS_HUTCHINSON, operator, num_matvecs, probes, long_run
    )
    run = _Hutchinson(call)
    return drive(run, call.config(run.dtype), call.long_run)


class _Hutchinson(ProbeSweep[TraceResult], TraceRun):
    """One sweep of ``m`` fresh probes, keeping their quadratic forms ``omega^T A omega``.

    The forms, not the products, are checked for inf/nan (a smaller host sync), so that
    the clean forms of a block with a bad product still reach the partial result.
    """

    algorithm = method = "hutchinson"
    check_products = False

    def __init__(self, call: ProbeCall) -> None:
        super().__init__(call)
        self.forms = torch.empty(self.m, dtype=torch.float64, device=self.op.device)

    def _take(self, col: int, X: torch.Tensor, AX: torch.Tensor) -> None:
        block = paired_dots(self.backend, self.op.size, X, AX)
        bad = first_non_finite(block)
        if bad is not None:
            self.forms[col : col + bad] = block[:bad]
            self.col += bad  # the clean forms of the block belong to the partial result
            self.fail(col + bad + 1)
        self.forms[col : col + X.shape[1]] = block

    def partial(self, stop_reason: StopReason) -> TraceResult | None:
        return self._estimate(stop_reason) if self.col >= 2 else None

    def result(self) -> TraceResult:
        return self._estimate("completed")

    def _estimate(self, stop_reason: StopReason) -> TraceResult:
        count = self.col
        return self._trace(
            self.forms[:count].cpu().numpy(),
            stop_reason,
            num_matvecs=count,
            details={"num_probes": count, "dof": count - 1},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.col, "forms": self.forms[: self.col].cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._enter("probes")
        self.col = int(state["done"])
        self.forms[: self.col] = state["forms"].to(self.forms.device)

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
import os
from typing import Any

import numpy as np
import torch

from hessian_eigenthings._compat import legacy_keywords
from hessian_eigenthings.algorithms._deadline import Deadline
from hessian_eigenthings.algorithms._estimator_utils import (
    agree_seed,
    check_block_size,
    check_distribution,
    check_num_matvecs,
    check_operator,
    draw_columns,
    first_non_finite,
    non_finite_error,
    paired_dots,
    resolve_seed,
    working_dtype,
)
from hessian_eigenthings.algorithms.checkpoint import (
    Checkpointer,
    generator_state,
    restore_generator,
)
from hessian_eigenthings.algorithms.estimator_results import TraceResult
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.errors import NonFiniteError
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
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    time_limit: float | None = None,
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
        checkpoint: Path of a checkpoint file (quadratic forms so far and the generator
            state, written between blocks); a call with the same arguments resumes from
            it, bit for bit. Deleted when done, kept when ``time_limit`` stops the call.
        checkpoint_every: Write every this many products (rounded up to whole blocks).
        checkpoint_seconds: Write when this many seconds passed since the last write.
        time_limit: Wall-clock seconds, checked between blocks: once passed (with at
            least 2 forms), the estimate of the forms so far is returned,
            ``stop_reason="time_limit"`` and ``num_matvecs`` the products used.

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
    operator = check_operator(operator, "hutchinson")
    m = check_num_matvecs(num_matvecs, MIN_MATVECS_HUTCHINSON, "hutchinson")
    distribution = check_distribution(distribution)
    block_size = check_block_size(block_size)
    backend = backend if backend is not None else operator.backend
    seed_ = agree_seed(resolve_seed(seed), backend, operator.device)
    dtype = working_dtype(operator)
    deadline = Deadline(time_limit)
    checkpointer = Checkpointer.create(
        checkpoint,
        checkpoint_every,
        checkpoint_seconds,
        algorithm="hutchinson",
        operator=operator,
        backend=backend,
        config={
            "num_matvecs": m,
            "distribution": distribution,
            "block_size": block_size,
            "seed": seed,
            "dtype": dtype,
        },
    )
    gen = backend.generator(seed_, operator.device)

    forms = torch.empty(m, dtype=torch.float64, device=operator.device)
    done = 0
    if checkpointer is not None:
        saved = checkpointer.load()
        if saved is not None:
            done = int(saved["done"])
            forms[:done] = saved["forms"].to(operator.device)
            seed_ = int(saved["seed"])
            restore_generator(gen, saved["generator"])

    def state() -> dict[str, Any]:
        return {
            "done": done,
            "forms": forms[:done].cpu(),
            "seed": seed_,
            "generator": generator_state(gen),
        }

    def result(count: int, stop_reason: str) -> TraceResult:
        return _result(forms[:count].cpu().numpy(), operator.size, distribution, seed_, stop_reason)

    stop_reason = "completed"
    done_at_start = done
    while done < m:
        # Checked only after this call made products (a resumed call advances a block).
        if done >= 2 and done > done_at_start and deadline.expired(operator.device):
            stop_reason = "time_limit"
            if checkpointer is not None:
                checkpointer.save(done, state())
            break
        if checkpointer is not None:
            checkpointer.maybe_save(done, state)
        b = min(block_size, m - done)
        omega = draw_columns(
            backend, operator, b, generator=gen, dtype=dtype, distribution=distribution
        )
        try:
            block = paired_dots(backend, operator.size, omega, operator.matmat(omega))
        except NonFiniteError as err:
            raise _error(operator, done, err, result) from err
        bad = first_non_finite(block)
        if bad is not None:
            forms[done : done + bad] = block[:bad]
            raise _error(operator, done + bad, None, result)
        forms[done : done + b] = block
        done += b
    out = result(done, stop_reason)
    if checkpointer is not None and stop_reason == "completed":
        checkpointer.finish()
    return out


def _error(
    operator: CurvatureOperator,
    clean: int,
    cause: NonFiniteError | None,
    result: Any,
) -> Exception:
    partial = result(clean, "non_finite") if clean >= 2 else None
    note = (
        f"err.partial holds the estimate from the {clean} quadratic forms before it"
        if partial is not None
        else "err.partial is None (fewer than 2 clean quadratic forms)"
    )
    return non_finite_error("Hutchinson", operator, clean + 1, cause, partial, note)


def _result(
    samples: np.ndarray, n: int, distribution: str, seed: int, stop_reason: str
) -> TraceResult:
    m = samples.size
    estimate = float(samples.mean())
    stderr = float(samples.std(ddof=1) / math.sqrt(m))
    return TraceResult(
        estimate=estimate,
        stderr=stderr,
        num_matvecs=m,
        operator_size=n,
        method="hutchinson",
        distribution=distribution,
        seed=seed,
        samples=samples,
        details={"num_probes": m, "dof": m - 1},
        stop_reason=stop_reason,
    )

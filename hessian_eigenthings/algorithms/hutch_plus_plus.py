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
import os
from typing import Any

import numpy as np
import torch

from hessian_eigenthings.algorithms._deadline import Deadline
from hessian_eigenthings.algorithms._estimator_utils import (
    agree_seed,
    check_block_size,
    check_distribution,
    check_num_matvecs,
    check_operator,
    check_single_device,
    check_sketch_options,
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
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    time_limit: float | None = None,
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
        checkpoint: Path of a checkpoint file, written between blocks (it holds the
            sketch: ``O(n k)`` numbers); a call with the same arguments resumes from it,
            bit for bit. Deleted when done, kept when ``time_limit`` stops the call.
        checkpoint_every: Write every this many products (rounded up to whole blocks).
        checkpoint_seconds: Write when this many seconds passed since the last write.
        time_limit: Wall-clock seconds, checked between blocks. Once passed, the partial
            estimate is returned with ``stop_reason="time_limit"``: with at least 2
            residual probes done, Hutch++ with those probes (``details["residual_probes"]``
            says how many); before that, Hutchinson on the sketch probes done so far
            (``omega_i^T A omega_i`` from the sketch products, unbiased;
            ``details["partial_estimator"] = "hutchinson_on_sketch"``).

    Returns:
        A :class:`TraceResult`; ``samples`` are the ``l`` residual quadratic forms and
        ``details`` holds ``sketch_size``, ``residual_probes`` and ``low_rank_trace``.

    Raises:
        NonFiniteError: A product was inf/nan; ``err.partial`` is the partial estimate
            from the products before it (as for ``time_limit``), or ``None``.
    """
    operator = check_operator(operator, "hutch_plus_plus")
    m = check_num_matvecs(num_matvecs, MIN_MATVECS_HUTCH_PLUS_PLUS, "hutch++")
    distribution = check_distribution(distribution)
    block_size = check_block_size(block_size)
    cap, store = check_sketch_options(max_sketch_size, sketch_device, operator)
    backend = backend if backend is not None else operator.backend
    check_single_device(backend, operator, "hutch_plus_plus")
    seed_ = agree_seed(resolve_seed(seed), backend, operator.device)
    dtype = working_dtype(operator)
    n = operator.size
    deadline = Deadline(time_limit)
    k = min(m // 3, n if cap is None else min(cap, n))
    num_resid = m - 2 * k
    checkpointer = Checkpointer.create(
        checkpoint,
        checkpoint_every,
        checkpoint_seconds,
        algorithm="hutch++",
        operator=operator,
        backend=backend,
        config={
            "num_matvecs": m,
            "distribution": distribution,
            "max_sketch_size": cap,
            "block_size": block_size,
            "seed": seed,
            "dtype": dtype,
        },
    )
    gen = backend.generator(seed_, operator.device)

    def draw(num: int) -> torch.Tensor:
        return draw_columns(
            backend, operator, num, generator=gen, dtype=dtype, distribution=distribution
        )

    # The run is a sequence of phases, each a loop over blocks of columns:
    #   "sketch":   Y = A S (S drawn up front), and the sketch forms s_i^T y_i;
    #   "low_rank": tr(Q^T A Q) with Q R = Y;
    #   "residual": Hutchinson on P A P with fresh probes P g_j.
    # Between blocks the state below is complete (saved / resumed there).
    phase, col = "sketch", 0
    empty = torch.empty(0, dtype=dtype, device=store)
    S, Y, Q = empty, empty, empty
    sketch_forms = torch.empty(k, dtype=torch.float64, device=store)
    low_rank = torch.zeros((), dtype=torch.float64, device=store)
    forms = torch.empty(num_resid, dtype=torch.float64, device=store)
    saved = checkpointer.load() if checkpointer is not None else None
    if saved is not None:
        phase, col, seed_ = str(saved["phase"]), int(saved["col"]), int(saved["seed"])
        restore_generator(gen, saved["generator"])
        sketch_forms.copy_(saved["sketch_forms"])
        low_rank = saved["low_rank"].to(store)
        forms[: saved["forms"].shape[0]] = saved["forms"].to(store)
        if phase == "sketch":
            S, Y = saved["S"].to(store), saved["Y"].to(store)
        else:
            Q = saved["Q"].to(store)
    else:
        S = draw(k).to(store)
        Y = torch.empty_like(S)

    def used() -> int:
        return {"sketch": col, "low_rank": k + col, "residual": 2 * k + col}[phase]

    used_at_start = used()

    def state() -> dict[str, Any]:
        out: dict[str, Any] = {
            "phase": phase,
            "col": col,
            "seed": seed_,
            "generator": generator_state(gen),
            "sketch_forms": sketch_forms.cpu(),
            "low_rank": low_rank.cpu(),
            "forms": forms[: col if phase == "residual" else 0].cpu(),
        }
        if phase == "sketch":
            out["S"], out["Y"] = S.cpu(), Y.cpu()
        else:
            out["Q"] = Q.cpu()
        return out

    def partial(stop_reason: str) -> TraceResult | None:
        if phase == "residual" and col >= 2:
            return _result(
                float(low_rank),
                forms[:col].cpu().numpy(),
                k,
                n,
                distribution,
                seed_,
                stop_reason,
                num_matvecs=2 * k + col,
            )
        done = col if phase == "sketch" else k
        if done < 2:
            return None
        samples = sketch_forms[:done].cpu().numpy()
        return TraceResult(
            estimate=float(samples.mean()),
            stderr=float(samples.std(ddof=1) / math.sqrt(done)),
            num_matvecs=used(),
            operator_size=n,
            method="hutch++",
            distribution=distribution,
            seed=seed_,
            samples=samples,
            details={
                "partial_estimator": "hutchinson_on_sketch",
                "num_probes": done,
                "dof": done - 1,
                "sketch_size": k,
            },
            stop_reason=stop_reason,
        )

    def product(X: torch.Tensor) -> torch.Tensor:
        try:
            out = operator.matmat(X.to(operator.device)).to(store)
        except NonFiniteError as err:
            p = partial("non_finite")
            raise non_finite_error("Hutch++", operator, used() + 1, err, p, _note(p)) from err
        bad = first_non_finite(out)
        if bad is not None:
            p = partial("non_finite")
            raise non_finite_error("Hutch++", operator, used() + bad + 1, None, p, _note(p))
        return out

    while True:
        if phase == "sketch" and col >= k:
            Q, _ = torch.linalg.qr(Y)
            S = Y = empty  # free the sketch
            phase, col = "low_rank", 0
        if phase == "low_rank" and col >= k:
            phase, col = "residual", 0
        if phase == "residual" and col >= num_resid:
            break
        # The limit is checked only after this call made products (a resumed call that
        # finds the limit passed at once still advances by one block).
        expired = used() > used_at_start and deadline.expired(operator.device)
        cut = partial("time_limit") if expired else None
        if cut is not None:
            if checkpointer is not None:
                checkpointer.save(used(), state())
            return cut
        if checkpointer is not None:
            checkpointer.maybe_save(used(), state)
        if phase == "sketch":
            b = min(block_size, k - col)
            Sb = S[:, col : col + b]
            Yb = product(Sb)
            Y[:, col : col + b] = Yb
            sketch_forms[col : col + b] = paired_dots(backend, n, Sb, Yb)
        elif phase == "low_rank":
            Qb = Q[:, col : col + block_size]
            b = Qb.shape[1]
            low_rank = low_rank + paired_dots(backend, n, Qb, product(Qb)).sum()
        else:
            b = min(block_size, num_resid - col)
            G = draw(b).to(store)
            G = G - Q @ (Q.T @ G)
            G = G - Q @ (Q.T @ G)  # P G orthogonal to Q
            forms[col : col + b] = paired_dots(backend, n, G, product(G))
        col += b

    out = _result(
        float(low_rank),
        forms.cpu().numpy(),
        k,
        n,
        distribution,
        seed_,
        "completed",
        num_matvecs=2 * k + num_resid,
    )
    if checkpointer is not None:
        checkpointer.finish()
    return out


def _note(partial: TraceResult | None) -> str:
    if partial is None:
        return "err.partial is None (fewer than 2 clean probes)"
    return (
        f"err.partial holds the estimate from the {partial.num_matvecs} products before it "
        f"({partial.details.get('partial_estimator', 'hutch++')})"
    )


def _result(
    low: float,
    samples: np.ndarray,
    k: int,
    n: int,
    distribution: str,
    seed: int,
    stop_reason: str,
    *,
    num_matvecs: int,
) -> TraceResult:
    num_resid = samples.size
    return TraceResult(
        estimate=low + float(samples.mean()),
        stderr=float(samples.std(ddof=1) / math.sqrt(num_resid)),
        num_matvecs=num_matvecs,
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
        stop_reason=stop_reason,
    )

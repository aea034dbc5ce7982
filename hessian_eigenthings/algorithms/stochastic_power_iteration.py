r"""Stochastic power iteration with momentum, and an eigenvalue estimate without bias.

For operators whose every product uses a fresh mini-batch (``full_dataset=False``): the
``t``-th product applies ``A_t`` with ``E[A_t] = A`` (the curvature of the mean loss), so
no single product is exact and the eigenvalue must be estimated from many of them.

Iteration (De Sa, He, Mitliagkas, Re & Xu, "Accelerated stochastic power iteration",
AISTATS 2018), for a momentum coefficient ``beta >= 0``:

.. math::  w_{t+1} = A_t w_t - \beta\, w_{t-1}.

With ``beta = lambda_2^2 / 4`` the deterministic recurrence converges at the rate of a
Chebyshev iteration, ``~ (1 - sqrt(1 - lambda_2/lambda_1))`` per step instead of
``lambda_2 / lambda_1``; ``beta = 0`` is plain power iteration. ``beta`` must stay below
``lambda_1^2 / 4`` (else the iterates oscillate). Both ``w_{t+1}`` and ``w_t`` are divided
by ``||w_{t+1}||`` after each step, which leaves the linear recurrence unchanged.

The eigenvalue estimate. Reading the eigenvalue off the momentum recurrence, e.g. as
``<w_t, w_{t+1}> / ||w_t||^2``, is biased: it equals the Rayleigh quotient minus
``beta <w_t, w_{t-1}> / ||w_t||^2`` and converges to the recurrence's growth rate
``(lambda_1 + sqrt(lambda_1^2 - 4 beta)) / 2``, not to ``lambda_1``. Here instead every step
records the Rayleigh quotient of the *normalised current iterate* ``v_t = w_t / ||w_t||``,

.. math::  \hat\theta_t = \langle v_t, A_t v_t \rangle,

from the same product ``A_t v_t`` the update needs (no extra matvec). ``v_t`` depends only
on the batches ``A_0 .. A_{t-1}``, and ``A_t`` is a fresh draw, so
``E[\hat\theta_t | v_t] = <v_t, A v_t>``: each sample is a conditionally unbiased estimate of
the exact Rayleigh quotient of the current iterate, whatever ``beta`` is. (The Rayleigh
quotient itself lies below ``lambda_1`` by ``O(sin^2 angle(v_t, u_1))`` until the iterate has
converged, for plain and momentum iterations alike, which is why only the last
``num_average`` samples are averaged.) "Fresh draw" assumes the batch order is independent
of the iterate, as with a shuffling ``DataLoader``.

For ``k > 1``, pairs are found one after another; each later iterate is kept orthogonal to
the vectors found before (projection deflation, two Gram-Schmidt passes).

Long runs: every 16 iterations the samples are checked for inf/nan (one host sync), the
``time_limit`` is checked, and the state (iterates, samples, pairs found, generator) is
written to ``checkpoint`` when due; a call with the same arguments resumes from it with
the same floating-point operations. The result is bit for bit the same as an
uninterrupted run when the operator's products are deterministic given the iterate
(``full_dataset=True``, or a LambdaOperator): the position of a ``full_dataset=False``
operator in its dataloader is not part of the checkpoint, so a resumed stochastic run
continues with other batches (statistically equivalent, not identical).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from hessian_eigenthings.algorithms._deadline import Deadline
from hessian_eigenthings.algorithms._estimator_utils import agree_seed
from hessian_eigenthings.algorithms.checkpoint import (
    Checkpointer,
    generator_state,
    restore_generator,
)
from hessian_eigenthings.algorithms.lanczos import default_vector_dtype
from hessian_eigenthings.algorithms.power_iteration import _check_common, _project_out
from hessian_eigenthings.algorithms.results import StochasticEigenResult
from hessian_eigenthings.backends.base import LinAlgBackend, fresh_seed
from hessian_eigenthings.errors import NonFiniteError
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["stochastic_power_iteration"]

# Iterations between finiteness / time-limit / checkpoint checks (one host sync each).
_CHECK_EVERY = 16


def stochastic_power_iteration(
    operator: CurvatureOperator,
    k: int = 1,
    *,
    max_iter: int = 200,
    momentum: float = 0.0,
    tol: float = 1e-2,
    seed: int | None = None,
    backend: LinAlgBackend | None = None,
    num_average: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    time_limit: float | None = None,
) -> StochasticEigenResult:
    r"""Top-``k`` eigenpairs of a stochastic operator by (accelerated) power iteration.

    See the module docstring for the recurrence and why the estimate is unbiased.

    Args:
        operator: Symmetric operator; typically one with ``full_dataset=False`` (a new
            batch per product). A deterministic operator works as well.
        k: Number of eigenpairs (sequential deflation), ``1 <= k <= size``.
        max_iter: Products (= iterations) per eigenpair; no early stop.
        momentum: ``beta`` of the recurrence (absolute, in units of eigenvalue
            squared); ``0`` is plain power iteration, ``~ lambda_2^2 / 4`` the
            accelerated choice of De Sa et al. (2018).
        tol: ``converged[i]`` iff the standard error of eigenvalue ``i`` is at most
            ``tol * |eigenvalue_i|``.
        seed: Seed of the start vectors; ``None`` draws a fresh one.
        backend: Vector backend; default ``operator.backend``.
        num_average: Number of final iterations whose samples are averaged; default
            ``max(1, max_iter // 4)``.
        checkpoint: Path of a checkpoint file, written every 16 iterations when due; a
            call with the same arguments resumes from it (see the module docstring for
            when that is bit for bit). Deleted when done, kept when ``time_limit`` stops.
        checkpoint_every: Write every this many products (rounded up to 16 iterations).
        checkpoint_seconds: Write when this many seconds passed since the last write.
        time_limit: Wall-clock seconds, checked every 16 iterations; once passed, the
            pairs found so far plus the current one are returned (the current one
            averages the last ``min(num_average, t)`` of its ``t`` samples), with
            ``stop_reason="time_limit"`` and ``converged`` judged by the same rule.

    Returns:
        A :class:`~hessian_eigenthings.algorithms.results.StochasticEigenResult`:
        ``eigenvalues`` are means of the ``num_average`` last samples ``<v_t, A_t v_t>``,
        ``eigenvalue_std`` / ``eigenvalue_stderr`` their spread, ``eigenvectors`` the
        final unit iterates, ``residuals`` the mean over the same window of the sampled
        residuals ``||A_t v_t - theta_t v_t||`` (these include the batch noise, so they
        overstate the residual of the mean operator).

    Raises:
        TypeError, ValueError: Bad operator, ``k``, budget, momentum, window or seed.
        NonFiniteError: The operator produced inf/nan (or ``momentum`` made the
            iterates overflow); a ``FloatingPointError``. ``err.partial`` holds the pairs
            found before it (``None`` if none).
    """
    _check_common(operator, max_iter, tol, seed)
    n = operator.size
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an int with 1 <= k <= operator.size = {n}, got {k!r}.")
    if not isinstance(momentum, (int, float)) or not (momentum >= 0 and math.isfinite(momentum)):
        raise ValueError(f"momentum must be a finite float >= 0, got {momentum!r}.")
    window = max(1, max_iter // 4) if num_average is None else num_average
    if not isinstance(window, int) or not 1 <= window <= max_iter:
        raise ValueError(
            f"num_average must be an int in [1, max_iter = {max_iter}], got {num_average!r}."
        )
    backend = backend or operator.backend
    vdtype = default_vector_dtype(operator.dtype)
    seed_ = agree_seed(fresh_seed() if seed is None else seed, backend, operator.device)
    deadline = Deadline(time_limit)
    checkpointer = Checkpointer.create(
        checkpoint,
        checkpoint_every,
        checkpoint_seconds,
        algorithm="stochastic_power_iteration",
        operator=operator,
        backend=backend,
        config={
            "k": k,
            "max_iter": max_iter,
            "momentum": float(momentum),
            "tol": float(tol),
            "num_average": window,
            "seed": seed,
            "dtype": vdtype,
        },
    )
    gen = backend.generator(seed_, operator.device)
    device = operator.device
    found = torch.zeros((k, backend.local_size(n)), dtype=vdtype, device=device)
    means: list[torch.Tensor] = []
    stds: list[torch.Tensor] = []
    residuals: list[torch.Tensor] = []
    windows: list[int] = []
    beta = float(momentum)
    resume: dict[str, Any] | None = None
    if checkpointer is not None:
        saved = checkpointer.load()
        if saved is not None:
            means, stds = list(saved["means"]), list(saved["stds"])
            residuals, windows = list(saved["residuals"]), list(saved["windows"])
            found[: len(means)] = saved["found"].to(device)
            seed_ = int(saved["seed"])
            restore_generator(gen, saved["generator"])
            resume = saved["current"]

    lists: dict[str, list[Any]] = {
        "means": means,
        "stds": stds,
        "residuals": residuals,
        "windows": windows,
    }

    def result(
        stop_reason: str, pairs: int | None = None, spent: int | None = None
    ) -> StochasticEigenResult:
        count = len(means) if pairs is None else pairs
        mean = torch.stack(means[:count])
        std = torch.stack(stds[:count])
        used = torch.tensor(windows[:count], dtype=torch.float64)
        stderr = std / used.sqrt()
        spent = count * max_iter if spent is None else spent
        return StochasticEigenResult(
            eigenvalues=mean,
            eigenvectors=found[:count].clone(),
            residuals=torch.stack(residuals[:count]),
            converged=stderr <= tol * mean.abs(),
            iterations=spent,
            num_matvecs=spent,
            which="LM",
            tol=float(tol),
            seed=seed_,
            method="stochastic_power_iteration",
            eigenvalue_std=std,
            eigenvalue_stderr=stderr,
            num_samples=min(windows[:count], default=window),  # smaller for a cut pair
            momentum=beta,
            stop_reason=stop_reason,
        )

    def non_finite(i: int, first_bad: int, cause: NonFiniteError | None) -> NonFiniteError:
        partial = result("non_finite", i) if i > 0 else None
        what = (
            f"product {first_bad} of this stochastic power iteration failed: {cause}"
            if cause is not None
            else f"{type(operator).__name__}.matvec produced non-finite values (inf/nan) at or "
            f"before product {first_bad} of this stochastic power iteration (or momentum is "
            "too large: it must stay below lambda_1^2 / 4)"
        )
        return NonFiniteError(
            f"{what}; err.partial holds the {i} pairs found before it"
            + ("" if partial is not None else " (None: no pair was finished)")
            + ".",
            partial=partial,
            matvec=first_bad,
            batch_index=None if cause is None else cause.batch_index,
            param_names=() if cause is None else cause.param_names,
        )

    for i in range(len(means), k):
        deflate = found[:i] if i > 0 else None
        samples = torch.zeros(max_iter, dtype=torch.float64, device=device)
        res = torch.zeros(max_iter, dtype=torch.float64, device=device)
        if resume is not None:
            t0 = int(resume["t"])
            w, w_prev = resume["w"].to(device), resume["w_prev"].to(device)
            v = resume["v"].to(device)
            samples[:t0] = resume["samples"].to(device)
            res[:t0] = resume["res"].to(device)
            resume = None
        else:
            t0 = 0
            w = backend.random(n, generator=gen, dtype=vdtype, device=device)
            w = _project_out(backend, deflate, w)
            w = w / backend.norm(w)
            w_prev = torch.zeros_like(w)
            v = w
        stopped_at = None
        for t in range(t0, max_iter):
            if t > t0 and t % _CHECK_EVERY == 0:
                lo = t - _CHECK_EVERY
                if not bool((torch.isfinite(samples[lo:t]) & torch.isfinite(res[lo:t])).all()):
                    raise non_finite(i, i * max_iter + t, None)
                if deadline.expired(device):
                    stopped_at = t
                    break
                if checkpointer is not None and checkpointer.due(i * max_iter + t):
                    checkpointer.save(
                        i * max_iter + t,
                        _state(lists, found[:i], seed_, gen, t, w, w_prev, v, samples, res),
                    )
            w_norm = backend.norm(w)
            v = w / w_norm
            try:
                y = operator.matvec(v)
            except NonFiniteError as err:
                raise non_finite(i, i * max_iter + t + 1, err) from err
            theta = backend.dot(v, y)
            samples[t] = theta.to(torch.float64)
            res[t] = backend.norm(y - theta * v).to(torch.float64)
            w_next = _project_out(backend, deflate, y) * w_norm - beta * w_prev
            scale = backend.norm(w_next).clamp_min(torch.finfo(vdtype).tiny)
            w_prev, w = w / scale, w_next / scale
        done = max_iter if stopped_at is None else stopped_at
        if stopped_at is not None and checkpointer is not None:
            # The resume point is iteration ``done`` of pair i, saved before the partial pair.
            checkpointer.save(
                i * max_iter + done,
                _state(lists, found[:i], seed_, gen, done, w, w_prev, v, samples, res),
            )
        win = min(window, done)
        tail = samples[done - win : done].cpu()
        if not (torch.isfinite(tail).all() and torch.isfinite(res[:done]).all()):
            raise non_finite(i, i * max_iter + done, None)
        means.append(tail.mean())
        stds.append(tail.std() if win > 1 else torch.tensor(0.0, dtype=torch.float64))
        residuals.append(res[done - win : done].mean().cpu())
        windows.append(win)
        found[i] = v
        if stopped_at is not None:
            return result("time_limit", spent=i * max_iter + done)
    out = result("completed")
    if checkpointer is not None:
        checkpointer.finish()
    return out


def _state(
    lists: dict[str, list[Any]],
    found: torch.Tensor,
    seed: int,
    gen: torch.Generator,
    t: int,
    w: torch.Tensor,
    w_prev: torch.Tensor,
    v: torch.Tensor,
    samples: torch.Tensor,
    res: torch.Tensor,
) -> dict[str, Any]:
    """Checkpoint state before iteration ``t`` of the current pair."""
    return {
        **lists,
        "found": found.cpu(),
        "seed": seed,
        "generator": generator_state(gen),
        "current": {
            "t": t,
            "w": w.cpu(),
            "w_prev": w_prev.cpu(),
            "v": v.cpu(),
            "samples": samples[:t].cpu(),
            "res": res[:t].cpu(),
        },
    }

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
"""

from __future__ import annotations

import math

import torch

from hessian_eigenthings.algorithms.lanczos import default_vector_dtype
from hessian_eigenthings.algorithms.power_iteration import _check_common, _project_out
from hessian_eigenthings.algorithms.results import StochasticEigenResult
from hessian_eigenthings.backends.base import LinAlgBackend, fresh_seed
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["stochastic_power_iteration"]


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

    Returns:
        A :class:`~hessian_eigenthings.algorithms.results.StochasticEigenResult`:
        ``eigenvalues`` are means of the ``num_average`` last samples ``<v_t, A_t v_t>``,
        ``eigenvalue_std`` / ``eigenvalue_stderr`` their spread, ``eigenvectors`` the
        final unit iterates, ``residuals`` the mean over the same window of the sampled
        residuals ``||A_t v_t - theta_t v_t||`` (these include the batch noise, so they
        overstate the residual of the mean operator).

    Raises:
        TypeError, ValueError: Bad operator, ``k``, budget, momentum, window or seed.
        FloatingPointError: The operator produced inf/nan (or ``momentum`` made the
            iterates overflow).
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
    seed_ = fresh_seed() if seed is None else seed
    gen = backend.generator(seed_, operator.device)
    device = operator.device
    found = torch.zeros((k, backend.local_size(n)), dtype=vdtype, device=device)
    means, stds, residuals = [], [], []
    beta = float(momentum)
    for i in range(k):
        deflate = found[:i] if i > 0 else None
        w = backend.random(n, generator=gen, dtype=vdtype, device=device)
        w = _project_out(backend, deflate, w)
        w = w / backend.norm(w)
        w_prev = torch.zeros_like(w)
        samples = torch.zeros(max_iter, dtype=torch.float64, device=device)
        res = torch.zeros(max_iter, dtype=torch.float64, device=device)
        v = w
        for t in range(max_iter):
            w_norm = backend.norm(w)
            v = w / w_norm
            y = operator.matvec(v)
            theta = backend.dot(v, y)
            samples[t] = theta.to(torch.float64)
            res[t] = backend.norm(y - theta * v).to(torch.float64)
            w_next = _project_out(backend, deflate, y) * w_norm - beta * w_prev
            scale = backend.norm(w_next).clamp_min(torch.finfo(vdtype).tiny)
            w_prev, w = w / scale, w_next / scale
        tail = samples[max_iter - window :].cpu()
        if not (torch.isfinite(tail).all() and torch.isfinite(res).all()):
            raise FloatingPointError(
                f"{type(operator).__name__}.matvec produced non-finite values (inf/nan) in "
                "stochastic power iteration (or momentum is too large: it must stay below "
                "lambda_1^2 / 4)."
            )
        means.append(tail.mean())
        stds.append(tail.std() if window > 1 else torch.tensor(0.0, dtype=torch.float64))
        residuals.append(res[max_iter - window :].mean().cpu())
        found[i] = v
    mean = torch.stack(means)
    std = torch.stack(stds)
    stderr = std / math.sqrt(window)
    return StochasticEigenResult(
        eigenvalues=mean,
        eigenvectors=found,
        residuals=torch.stack(residuals),
        converged=stderr <= tol * mean.abs(),
        iterations=k * max_iter,
        num_matvecs=k * max_iter,
        which="LM",
        tol=float(tol),
        seed=seed_,
        method="stochastic_power_iteration",
        eigenvalue_std=std,
        eigenvalue_stderr=stderr,
        num_samples=window,
        momentum=beta,
    )

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
from typing import Any

import torch
from typing_extensions import Unpack

from hessian_eigenthings.algorithms._calls import SolverCall
from hessian_eigenthings.algorithms._precision import default_vector_dtype
from hessian_eigenthings.algorithms._records import StopReason
from hessian_eigenthings.algorithms._run import (
    LongRunOptions,
    ResumableRun,
    drive,
    first_non_finite,
)
from hessian_eigenthings.algorithms._validation import check_int
from hessian_eigenthings.algorithms.power_iteration import project_out, random_unit_vector
from hessian_eigenthings.algorithms.results import StochasticEigenResult
from hessian_eigenthings.backends.base import LinAlgBackend
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
    **long_run: Unpack[LongRunOptions],
) -> StochasticEigenResult:
    r"""Top-``k`` eigenpairs of a stochastic operator by (accelerated) power iteration.

    See the module docstring for the recurrence and why the estimate is unbiased.

    Args:
        operator: Symmetric operator; typically one with ``full_dataset=False`` (a new
            batch per product). A deterministic operator works as well.
        k: Number of eigenpairs (sequential deflation), ``1 <= k <= size``.
        max_iter: Budget of matrix-vector products *per eigenpair* (each iteration is
            one product); all of it is spent (no early stop).
        momentum: ``beta`` of the recurrence (absolute, in units of eigenvalue
            squared); ``0`` is plain power iteration, ``~ lambda_2^2 / 4`` the
            accelerated choice of De Sa et al. (2018).
        tol: ``converged[i]`` iff the standard error of eigenvalue ``i`` is at most
            ``tol * |eigenvalue_i|``.
        seed: Seed of the start vectors; ``None`` draws a fresh one.
        backend: Vector backend; default ``operator.backend``.
        num_average: Number of final iterations whose samples are averaged; default
            ``max(1, max_iter // 4)``.
        **long_run: ``checkpoint``, ``checkpoint_every``, ``checkpoint_seconds``,
            ``time_limit`` (see :class:`~hessian_eigenthings.algorithms.LongRunOptions`).
            Checked every 16 iterations; a resumed call is bit for bit the uninterrupted
            one when the products are deterministic (see the module docstring). A
            time-limited call returns the pairs found so far plus the current one (which
            averages the last ``min(num_average, t)`` of its ``t`` samples), with
            ``converged`` judged by the same rule.

    Returns:
        A :class:`~hessian_eigenthings.algorithms.results.StochasticEigenResult`
        (``stop_reason`` ``"converged"`` when every pair meets ``tol``, else
        ``"max_iter"``):
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
    call = SolverCall.check(
        "stochastic_power_iteration",
        operator,
        k,
        tol=tol,
        seed=seed,
        backend=backend,
        long_run=long_run,
    )
    max_iter = check_int(max_iter, "max_iter", why=" (matrix-vector products per pair)")
    if not isinstance(momentum, (int, float)) or not (momentum >= 0 and math.isfinite(momentum)):
        raise ValueError(f"momentum must be a finite float >= 0, got {momentum!r}.")
    window = check_int(
        max(1, max_iter // 4) if num_average is None else num_average,
        "num_average",
        1,
        max_iter,
    )
    run = _StochasticPowerIteration(call, max_iter, float(momentum), window)
    config = {"k": call.k, "max_iter": max_iter, "momentum": float(momentum), "tol": run.tol}
    return drive(
        run,
        {**config, "num_average": window, "seed": call.seed_arg, "dtype": run.found.dtype},
        call.long_run,
    )


class _StochasticPowerIteration(ResumableRun[StochasticEigenResult]):
    """``k`` pairs one after another, ``max_iter`` iterations each.

    A step runs to the next multiple of 16 iterations of the current pair (finishing
    pairs and starting the next ones on the way) and checks the samples for inf/nan there.
    """

    algorithm = "stochastic_power_iteration"

    def __init__(self, call: SolverCall, max_iter: int, momentum: float, window: int) -> None:
        super().__init__(call.operator, call.backend, call.seed)
        operator, backend = call.operator, call.backend
        vdtype = default_vector_dtype(operator.dtype)
        self.k, self.max_iter, self.beta, self.window = call.k, max_iter, momentum, window
        self.tol = 1e-2 if call.tol is None else call.tol
        n_local = backend.local_size(operator.size)
        self.found = torch.zeros((self.k, n_local), dtype=vdtype, device=operator.device)
        # Finished pairs: mean and std of the averaged samples, residual, window size.
        self.pairs: dict[str, list[Any]] = {"means": [], "stds": [], "residuals": [], "windows": []}
        # The current pair: iteration t, iterates w_t, w_{t-1}, v_t, samples so far.
        self.t = 0
        self.w: torch.Tensor | None = None  # None: the next pair has not started
        self.w_prev = self.v = torch.empty(0, dtype=vdtype, device=operator.device)
        self.samples = torch.zeros(max_iter, dtype=torch.float64, device=operator.device)
        self.res = torch.zeros_like(self.samples)

    def _done_pairs(self) -> int:
        return len(self.pairs["means"])

    def used(self) -> int:
        return self._done_pairs() * self.max_iter + self.t

    def done(self) -> bool:
        return self._done_pairs() >= self.k

    def _deflate(self) -> torch.Tensor | None:
        i = self._done_pairs()
        return self.found[:i] if i > 0 else None

    def step(self) -> None:
        start = self.t
        while True:
            w = self.w
            if w is None:  # start the next pair
                w = random_unit_vector(self, self.found.dtype, self._deflate())
                self.w_prev, self.v = torch.zeros_like(w), w
                self.t, start = 0, 0
                self.samples.zero_()
                self.res.zero_()
            self._iterate(w)
            if self.t < self.max_iter and self.t % _CHECK_EVERY == 0 and self.t > start:
                self._check_finite(self.t - _CHECK_EVERY, self.t)
                return
            self._check_finite(0, self.t)
            self._finish_pair()
            if self.done():
                return

    def _iterate(self, w: torch.Tensor) -> None:
        """Iterations from ``w = w_t`` up to the next multiple of 16 or the end of the pair."""
        backend, deflate, beta = self.backend, self._deflate(), self.beta
        w_prev, v = self.w_prev, self.v
        tiny = torch.finfo(w.dtype).tiny
        stop = min(self.max_iter, (self.t // _CHECK_EVERY + 1) * _CHECK_EVERY)
        for t in range(self.t, stop):
            w_norm = backend.norm(w)
            v = w / w_norm
            self.t = t  # a failing product is product t + 1 of the pair
            y = self.apply(v, check=False)  # checked through the samples
            theta = backend.dot(v, y)
            self.samples[t] = theta.to(torch.float64)
            self.res[t] = backend.norm(y - theta * v).to(torch.float64)
            w_next = project_out(backend, deflate, y) * w_norm - beta * w_prev
            scale = backend.norm(w_next).clamp_min(tiny)
            w_prev, w = w / scale, w_next / scale
        self.t = stop
        self.w, self.w_prev, self.v = w, w_prev, v

    def _check_finite(self, lo: int, hi: int) -> None:
        bad = first_non_finite(torch.stack([self.samples[lo:hi], self.res[lo:hi]]))
        if bad is not None:
            self.fail(
                self._done_pairs() * self.max_iter + lo + bad + 1,
                hint=" (or the momentum is too large: it must stay below lambda_1^2 / 4)",
            )

    def _cut(self, t: int) -> dict[str, Any]:
        """The current pair averaged over the last ``min(num_average, t)`` samples."""
        win = min(self.window, t)
        tail = self.samples[t - win : t].cpu()
        return {
            "means": tail.mean(),
            "stds": tail.std() if win > 1 else torch.tensor(0.0, dtype=torch.float64),
            "residuals": self.res[t - win : t].mean().cpu(),
            "windows": win,
        }

    def _finish_pair(self) -> None:
        i = self._done_pairs()
        for key, value in self._cut(self.max_iter).items():
            self.pairs[key].append(value)
        self.found[i] = self.v
        self.w, self.t = None, 0

    def _eigen(
        self,
        pairs: dict[str, list[Any]],
        vectors: torch.Tensor,
        spent: int,
        stop: StopReason | None,
    ) -> StochasticEigenResult:
        mean = torch.stack(pairs["means"])
        std = torch.stack(pairs["stds"])
        stderr = std / torch.tensor(pairs["windows"], dtype=torch.float64).sqrt()
        converged = stderr <= self.tol * mean.abs()
        return StochasticEigenResult(
            eigenvalues=mean,
            eigenvectors=vectors,
            residuals=torch.stack(pairs["residuals"]),
            converged=converged,
            iterations=spent,
            num_matvecs=spent,
            which="LM",
            tol=self.tol,
            seed=self.seed,
            method=self.algorithm,
            eigenvalue_std=std,
            eigenvalue_stderr=stderr,
            num_samples=min(pairs["windows"]),  # smaller for a cut pair
            momentum=self.beta,
            stop_reason=stop or ("converged" if bool(converged.all()) else "max_iter"),
        )

    def partial(self, stop_reason: StopReason) -> StochasticEigenResult | None:
        i = self._done_pairs()
        if stop_reason != "time_limit":  # the pairs finished before the bad product
            if i == 0:
                return None
            return self._eigen(self.pairs, self.found[:i].clone(), i * self.max_iter, stop_reason)
        cut = self._cut(self.t)
        pairs = {key: [*values, cut[key]] for key, values in self.pairs.items()}
        vectors = torch.cat([self.found[:i], self.v[None]])
        return self._eigen(pairs, vectors, i * self.max_iter + self.t, stop_reason)

    def result(self) -> StochasticEigenResult:
        return self._eigen(self.pairs, self.found.clone(), self.k * self.max_iter, None)

    def state_dict(self) -> dict[str, Any]:
        i, t = self._done_pairs(), self.t
        current = None
        if self.w is not None:
            current = {
                "t": t,
                "w": self.w.cpu(),
                "w_prev": self.w_prev.cpu(),
                "v": self.v.cpu(),
                "samples": self.samples[:t].cpu(),
                "res": self.res[:t].cpu(),
            }
        return {**self.pairs, "found": self.found[:i].cpu(), "current": current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self.pairs:
            self.pairs[key] = list(state[key])
        device = self.op.device
        self.found[: self._done_pairs()] = state["found"].to(device)
        current = state["current"]
        if current is not None:
            self.t = int(current["t"])
            self.w, self.w_prev = current["w"].to(device), current["w_prev"].to(device)
            self.v = current["v"].to(device)
            self.samples[: self.t] = current["samples"].to(device)
            self.res[: self.t] = current["res"].to(device)

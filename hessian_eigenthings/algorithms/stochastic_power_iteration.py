r"""Stochastic power iteration with momentum, and an eigenvalue estimate without its bias.

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
``(lambda_1 + sqrt(lambda_1^2 - 4 beta)) / 2``, not to ``lambda_1``. Every step records
instead the Rayleigh quotient of the *normalised current iterate* ``v_t = w_t / ||w_t||``,

.. math::  \hat\theta_t = \langle v_t, A_t v_t \rangle,

from the same product ``A_t v_t`` the update needs (no extra matvec). ``v_t`` depends only
on the batches ``A_0 .. A_{t-1}``, and ``A_t`` is a fresh draw, so
``E[\hat\theta_t | v_t] = <v_t, A v_t>``: each sample is a conditionally unbiased estimate of
the exact Rayleigh quotient of the current iterate, whatever ``beta`` is. That is *not* an
unbiased estimate of ``lambda_1``: with noisy products the iterate never settles on ``u_1``
but fluctuates around it, and its Rayleigh quotient lies below ``lambda_1`` by
``sum_j (lambda_1 - lambda_j) <v_t, u_j>^2``, at every step. The mean of the samples is
biased low by the mean of that deficit, which does not shrink with more samples (a few
percent at a noise that moves the iterate by ``~0.2`` rad; 15-30% for mini-batch
Hessians of small networks; momentum makes it worse, it amplifies the noise).

Averaged iterates, lagged products (the estimate returned). Over the last ``num_average``
iterations (the window), the aligned iterates ``s_t v_t`` (``s_t = +-1`` keeps the sign of
their running sum; a negative ``lambda_1`` flips the iterate each step) are summed in
``B = 10`` consecutive blocks, ``V_b = sum_{t in b} s_t v_t``, and each block's products
are paired with the sum of the blocks *at least one block earlier*,
``P_b = V_0 + ... + V_{b-2}``:

.. math::

    \hat\lambda = \frac{\sum_{b \ge 2} \sum_{t \in b} \langle P_b, s_t A_t v_t\rangle}
                         {\sum_{b \ge 2} \sum_{t \in b} \langle P_b, s_t v_t\rangle}.

``P_b`` and ``v_t`` are fixed before ``A_t`` is drawn, so the numerator is an unbiased
estimate of ``sum_{a < b-1} <V_a, A V_b>`` and the ratio is a cross Rayleigh quotient of
block averages one block apart. The fluctuations of the iterate are (nearly) uncorrelated
between blocks that far apart, so in ``<V_a, A V_b>`` their contributions average out
instead of adding up as the squares ``<v_t, u_j>^2`` do: what remains is ``lambda_1`` times
the aligned part. The bias falls by one to two orders of magnitude (measured in
``benchmarks/bench_spi_coverage.py``: from -3.1% to +0.05% at the noise above, from
-22% to -1% for a 64-sample mini-batch covariance). The standard error is that of a ratio
estimator over the ``B - 2`` block terms (batch means: the correlation of consecutive
iterates is inside the blocks), and never below ``std / sqrt(num_average)``, the error of
as many independent single-product samples (a loader that repeats its batches in a
fixed cycle, e.g. a list with ``full_dataset=False``, makes the iteration periodic: if the
period divides the block length, the block terms agree and their spread understates the
error; shuffle the loader). The eigenvector returned is the normalised sum of the
window's aligned iterates (itself closer to ``u_1`` than any one iterate). Extra cost:
three vectors of memory and three inner products per iteration in the window; no product.

"Fresh draw" assumes the batch order is independent of the iterate, as with a shuffling
``DataLoader``. For the exact Rayleigh quotient of the returned vector, multiply it once
by the full-data operator (``full_dataset=True``): ``<u, A u>`` is a lower bound of
``lambda_1`` (for the largest eigenvalue), tight when the vector is good.

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
# Blocks of the averaging window (the lagged estimate has _BLOCKS - 2 terms).
_BLOCKS = 10
# Below this many window iterations the estimate is the plain mean of the samples.
_MIN_BLOCKED = 4


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

    See the module docstring for the recurrence and the estimate: the lagged cross
    Rayleigh quotient of block-averaged iterates, which removes most of the low bias that
    the mean of the samples ``<v_t, A_t v_t>`` has on noisy operators.

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
            ``tol * |eigenvalue_i|`` (a statement about the noise of the estimate, not a
            residual).
        seed: Seed of the start vectors; ``None`` draws a fresh one.
        backend: Vector backend; default ``operator.backend``.
        num_average: The window: number of final iterations whose iterates and products
            make the estimate; default ``max(1, max_iter // 4)``. With fewer than 4 the
            estimate is the plain mean of the window's samples (biased low on noisy
            operators, see the module docstring). A longer window lowers both the bias and
            the standard error; the iterate must have converged (up to its noise) before
            the window starts.
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
        ``eigenvalues`` are the lagged block estimates of the module docstring,
        ``eigenvalue_stderr`` their standard errors (the spread of the block terms),
        ``eigenvalue_std`` the standard deviation of the window's single samples
        ``<v_t, A_t v_t>`` (the noise of one product), ``eigenvectors`` the normalised
        averages of the window's iterates, ``residuals`` the mean over the window of the
        sampled residuals ``||A_t v_t - theta_t v_t||`` (these include the batch noise,
        so they overstate the residual of the mean operator).

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
        {
            **config,
            "num_average": window,
            "estimate": "lagged-blocks",  # checkpoints of the earlier sample mean differ
            "seed": call.seed_arg,
            "dtype": run.found.dtype,
        },
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
        self.blocks = min(_BLOCKS, window) if window >= _MIN_BLOCKED else 0
        self.tol = 1e-2 if call.tol is None else call.tol
        n_local = backend.local_size(operator.size)
        self.found = torch.zeros((self.k, n_local), dtype=vdtype, device=operator.device)
        # Finished pairs: estimate, std of the samples, stderr, residual, window size.
        self.pairs: dict[str, list[Any]] = {
            "means": [],
            "stds": [],
            "stderrs": [],
            "residuals": [],
            "windows": [],
        }
        # The current pair: iteration t, iterates w_t, w_{t-1}, v_t, samples so far.
        self.t = 0
        self.w: torch.Tensor | None = None  # None: the next pair has not started
        self.w_prev = self.v = torch.empty(0, dtype=vdtype, device=operator.device)
        self.samples = torch.zeros(max_iter, dtype=torch.float64, device=operator.device)
        self.res = torch.zeros_like(self.samples)
        # The window's block sums: P = V_0 + .. + V_{b-2}, V_{b-1}, V_b (aligned iterates),
        # and per block the lagged sums <P, s_t A_t v_t> and <P, s_t v_t>.
        self.acc = torch.zeros((3, n_local), dtype=vdtype, device=operator.device)
        self.rows = torch.zeros(
            (2, max(self.blocks, 1)), dtype=torch.float64, device=operator.device
        )

    def _done_pairs(self) -> int:
        return len(self.pairs["means"])

    def used(self) -> int:
        return self._done_pairs() * self.max_iter + self.t

    def done(self) -> bool:
        return self._done_pairs() >= self.k

    def _deflate(self) -> torch.Tensor | None:
        i = self._done_pairs()
        return self.found[:i] if i > 0 else None

    def _block(self, t: int) -> int:
        """Block of iteration ``t`` of the pair, or -1 before the window."""
        i = t - (self.max_iter - self.window)
        return -1 if i < 0 or self.blocks == 0 else (i * self.blocks) // self.window

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
                self.acc.zero_()
                self.rows.zero_()
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
            self._accumulate(t, v, y)
            w_next = project_out(backend, deflate, y) * w_norm - beta * w_prev
            scale = backend.norm(w_next).clamp_min(tiny)
            w_prev, w = w / scale, w_next / scale
        self.t = stop
        self.w, self.w_prev, self.v = w, w_prev, v

    def _accumulate(self, t: int, v: torch.Tensor, y: torch.Tensor) -> None:
        """Add iteration ``t`` (iterate ``v``, product ``y``) to the window's sums (no sync)."""
        b = self._block(t)
        if b < 0:
            return
        acc, backend = self.acc, self.backend
        if b > 0 and b != self._block(t - 1):  # a new block: shift P += V_{b-2}
            acc[0] += acc[1]
            acc[1] = acc[2]
            acc[2].zero_()
        total = acc[0] + acc[1] + acc[2]
        sign = torch.where(backend.dot(total, v) >= 0, 1.0, -1.0).to(v.dtype)
        acc[2] += sign * v
        self.rows[0, b] += (sign * backend.dot(acc[0], y)).to(torch.float64)
        self.rows[1, b] += (sign * backend.dot(acc[0], v)).to(torch.float64)

    def _check_finite(self, lo: int, hi: int) -> None:
        bad = first_non_finite(torch.stack([self.samples[lo:hi], self.res[lo:hi]]))
        if bad is not None:
            self.fail(
                self._done_pairs() * self.max_iter + lo + bad + 1,
                hint=" (or the momentum is too large: it must stay below lambda_1^2 / 4)",
            )

    def _cut(self, t: int) -> dict[str, Any]:
        """The current pair's estimate after ``t`` iterations (see the module docstring).

        The lagged block estimate once at least two of its block terms have started; before
        that (a time-limited cut early in the window, or a window of fewer than 4
        iterations), or when the block averages are not aligned at all (a non-positive
        denominator: the iterate has not converged to a direction), the mean of the last
        ``min(num_average, t)`` samples, with the standard error of independent samples,
        and the current iterate.
        """
        win = min(self.window, t)
        tail = self.samples[t - win : t].cpu()
        std = tail.std() if win > 1 else torch.tensor(0.0, dtype=torch.float64)
        cut = {"stds": std, "residuals": self.res[t - win : t].mean().cpu(), "windows": win}
        last = self._block(t - 1) if t > 0 else -1
        num, den = self.rows[:, 2 : max(last + 1, 2)].cpu()
        if last >= 3 and float(den.sum()) > 0:  # else the block averages share no direction
            estimate = num.sum() / den.sum()
            m = num.numel()
            spread = ((num - estimate * den) ** 2).sum() * m / (m - 1)
            total = self.acc.sum(dim=0)
            # Never below the error of win independent samples: a batch order that repeats
            # with the block length (a cycling loader) makes the block terms alike.
            stderr = torch.maximum(spread.sqrt() / den.sum(), std / math.sqrt(win))
            return {
                **cut,
                "means": estimate,
                "stderrs": stderr,
                "vector": total / self.backend.norm(total),
            }
        return {**cut, "means": tail.mean(), "stderrs": std / math.sqrt(win), "vector": self.v}

    def _finish_pair(self) -> None:
        i = self._done_pairs()
        cut = self._cut(self.max_iter)
        self.found[i] = cut.pop("vector")
        for key, value in cut.items():
            self.pairs[key].append(value)
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
        stderr = torch.stack(pairs["stderrs"])
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
        vector = cut.pop("vector")
        pairs = {key: [*values, cut[key]] for key, values in self.pairs.items()}
        vectors = torch.cat([self.found[:i], vector[None]])
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
                "acc": self.acc.cpu(),
                "rows": self.rows.cpu(),
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
            self.acc = current["acc"].to(device)
            self.rows = current["rows"].to(device)

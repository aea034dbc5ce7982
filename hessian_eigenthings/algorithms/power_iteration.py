r"""Power iteration and deflated power iteration with honest residuals.

Power iteration repeats ``v <- A v / ||A v||`` and converges to the eigenvector of the
eigenvalue of largest magnitude at the rate ``|lambda_2 / lambda_1|`` per product
(Golub & Van Loan, *Matrix Computations*, 4th ed., sec. 8.2.1). Each step reads the
Rayleigh quotient and the residual of the *current* unit vector from the product it
needs anyway:

.. math::  w = A v, \qquad \theta = \langle v, w \rangle, \qquad r = \|w - \theta v\|_2,

so the residual reported with ``(theta, v)`` is the true ``||A v - theta v||`` (no bound,
no extrapolation). Convergence: ``r <= tol * max(|theta|, eps^(1/3) |theta|_max)`` as in
:func:`~hessian_eigenthings.algorithms.lanczos.lanczos`. The iteration continues to
``tol / 10`` (stopping earlier only when the residual stagnates below ``tol``), because a
deflated later pair inherits a residual of about ``|lambda_1| * ||v_1 - u_1||`` from an
inexact earlier vector; ``converged`` always refers to ``tol``.

Deflated power iteration finds ``k`` pairs one after another, keeping each new iterate
orthogonal to the eigenvectors already found (projection deflation, two Gram-Schmidt
passes; the approach of HessianFlow: Yao, Gholami, Lei, Keutzer & Mahoney, "Hessian-based
analysis of large batch training and robustness to adversaries", NeurIPS 2018). It
converges like power iteration on ``(I - U U^T) A (I - U U^T)``: slowly when eigenvalues
are close in magnitude. Prefer :func:`~hessian_eigenthings.algorithms.lanczos.lanczos`.

Long runs: ``checkpoint=`` saves the pairs found so far, the current iterate and the
generator state at convergence checks (every 4 products); a call with the same arguments
resumes from it with the same floating-point operations (bit for bit the same result).
``time_limit=`` returns the pairs found so far plus the current iterate (with its true
residual and honest ``converged`` flag) once passed. A non-finite product raises
:class:`~hessian_eigenthings.errors.NonFiniteError` whose ``partial`` holds the
pairs found before it and the last clean iterate of the current pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import Unpack

from hessian_eigenthings._compat import legacy_keywords, power_iteration_momentum
from hessian_eigenthings.algorithms._calls import SolverCall
from hessian_eigenthings.algorithms._precision import default_tol, default_vector_dtype, eps
from hessian_eigenthings.algorithms._records import StopReason
from hessian_eigenthings.algorithms._run import (
    LongRunOptions,
    ResumableRun,
    drive,
)
from hessian_eigenthings.algorithms._validation import check_int
from hessian_eigenthings.algorithms.results import EigenResult
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["deflated_power_iteration", "power_iteration_one"]

# Iterations between convergence checks (one host sync each).
_CHECK_EVERY = 4
# Pairs are iterated to _SAFETY * tol unless the residual stagnates below tol.
_SAFETY = 0.1


def project_out(
    backend: LinAlgBackend, basis: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """``(I - U U^T) x`` by two classical Gram-Schmidt passes (rows of ``basis`` = U)."""
    if basis is None or basis.shape[0] == 0:
        return x
    for _ in range(2):
        x = x - backend.gram(basis.T, x) @ basis
    return x


def random_unit_vector(
    run: ResumableRun[Any], dtype: torch.dtype, deflate: torch.Tensor | None
) -> torch.Tensor:
    """A random start vector of ``run``, orthogonal to the rows of ``deflate``, of norm 1."""
    backend = run.backend
    v = backend.random(run.op.size, generator=run.gen, dtype=dtype, device=run.op.device)
    v = project_out(backend, deflate, v)
    return v / backend.norm(v)


@legacy_keywords({"init": "init_vec"}, power_iteration_momentum)
def power_iteration_one(
    operator: CurvatureOperator,
    *,
    max_iter: int = 1000,
    tol: float | None = None,
    seed: int | None = None,
    backend: LinAlgBackend | None = None,
    init_vec: torch.Tensor | None = None,
    **long_run: Unpack[LongRunOptions],
) -> EigenResult:
    """The eigenpair of largest magnitude by power iteration.

    Args:
        operator: Symmetric curvature operator.
        max_iter: Budget of matrix-vector products (each iteration is one product).
        tol: Relative residual tolerance (see the module docstring); default
            :func:`~hessian_eigenthings.algorithms.lanczos.default_tol`.
        seed: Seed of the random start vector; ``None`` draws a fresh one (rank 0's under
            a distributed backend).
        backend: Vector backend; default ``operator.backend``.
        init_vec: Start vector of shape ``(size,)`` instead of a random one (not
            modified; normalised internally).
        **long_run: ``checkpoint``, ``checkpoint_every``, ``checkpoint_seconds``,
            ``time_limit`` (see :class:`~hessian_eigenthings.algorithms.LongRunOptions`).
            Checkpoints are written at convergence checks (every 4 products) and are not
            available with ``init_vec``; a time-limited call returns the current iterate
            with its true residual and honest ``converged`` flag.

    Returns:
        An :class:`EigenResult` with ``k = 1``; ``residuals`` holds the true
        ``||A v - theta v||`` of the returned pair. ``eigenvalue, eigenvector = result``
        unpacks it (shapes ``(1,)`` and ``(1, n)``).

    Raises:
        TypeError, ValueError: Bad operator, budget, tolerance, seed or start vector.
        NonFiniteError: A product was inf/nan (``err.partial``: the last clean iterate).
    """
    call = SolverCall.check(
        "power_iteration_one", operator, 1, tol=tol, seed=seed, backend=backend, long_run=long_run
    )
    max_iter = check_int(max_iter, "max_iter", why=" (matrix-vector products)")
    operator, backend = call.operator, call.backend
    vdtype = default_vector_dtype(operator.dtype)
    v0 = None
    if init_vec is not None:
        if not isinstance(init_vec, torch.Tensor) or init_vec.shape != (
            backend.local_size(operator.size),
        ):
            got = tuple(init_vec.shape) if isinstance(init_vec, torch.Tensor) else init_vec
            raise ValueError(f"init_vec must be a tensor of shape ({operator.size},), got {got!r}.")
        if call.long_run.checkpoint is not None:
            raise ValueError(
                "checkpoint= cannot be combined with init_vec (the start vector is not "
                "recorded); drop one of them."
            )
        v0 = init_vec.detach().to(device=operator.device, dtype=vdtype)
        norm = backend.norm(v0)
        if not bool(norm > 0):
            raise ValueError("init_vec must be nonzero.")
        v0 = v0 / norm
    run = _PowerIteration(call, max_iter, v0, "power_iteration")
    return drive(run, run.config(), call.long_run)


@legacy_keywords({"num_eigs": "k"}, power_iteration_momentum)
def deflated_power_iteration(
    operator: CurvatureOperator,
    k: int = 1,
    *,
    max_iter: int = 1000,
    tol: float | None = None,
    seed: int | None = None,
    backend: LinAlgBackend | None = None,
    **long_run: Unpack[LongRunOptions],
) -> EigenResult:
    """``k`` eigenpairs of largest magnitude by power iteration with projection deflation.

    Pair ``i`` is found by power iteration on ``P_i A`` with ``P_i = I - U_i U_i^T`` and
    ``U_i`` the unit eigenvectors found before it. Its residual is measured against ``A``
    itself, ``||A v_i - theta_i v_i||`` (true, not a bound), so an inaccurate earlier
    vector cannot make a later pair look converged.

    Args:
        operator: Symmetric curvature operator.
        k: Number of eigenpairs, ``1 <= k <= size``.
        max_iter: Budget of matrix-vector products *per eigenpair* (each iteration is
            one product).
        tol: Relative residual tolerance; default
            :func:`~hessian_eigenthings.algorithms.lanczos.default_tol`.
        seed: Seed of the random start vectors; ``None`` draws a fresh one (rank 0's
            under a distributed backend).
        backend: Vector backend; default ``operator.backend``.
        **long_run: ``checkpoint``, ``checkpoint_every``, ``checkpoint_seconds``,
            ``time_limit`` (see :class:`~hessian_eigenthings.algorithms.LongRunOptions`).
            The checkpoint holds the pairs found and the current iterate, written at
            convergence checks; a time-limited call returns the pairs found so far plus
            the current iterate (fewer than ``k`` rows possible), with true residuals
            and honest flags.

    Returns:
        An :class:`EigenResult` in the order found (decreasing magnitude when every pair
        converged); ``converged[i]`` is False for a pair that used its whole budget.
        ``iterations`` and ``num_matvecs`` are totals over all pairs.

    Raises:
        NonFiniteError: A product was inf/nan (``err.partial``: the pairs found before it).
    """
    call = SolverCall.check(
        "deflated_power_iteration",
        operator,
        k,
        tol=tol,
        seed=seed,
        backend=backend,
        long_run=long_run,
    )
    max_iter = check_int(max_iter, "max_iter", why=" (matrix-vector products)")
    run = _PowerIteration(call, max_iter, None, "deflated_power_iteration")
    return drive(run, {"k": call.k, **run.config()}, call.long_run)


@dataclass
class _Pair:
    """An iterate with its Rayleigh quotient and true residual (float64 CPU scalars)."""

    theta: torch.Tensor
    vector: torch.Tensor
    residual: torch.Tensor
    converged: bool
    used: int


class _PowerIteration(ResumableRun[EigenResult]):
    """``k`` pairs one after another; a step runs to the next convergence check.

    A step ends at a check where the current pair continues (the point where the driver
    may stop or save), or when all pairs are found; pairs that finish within a step are
    recorded and the next one starts at once.
    """

    def __init__(
        self, call: SolverCall, max_iter: int, init_vec: torch.Tensor | None, algorithm: str
    ) -> None:
        super().__init__(call.operator, call.backend, call.seed)
        operator, backend = call.operator, call.backend
        self.algorithm, self.seed_arg = algorithm, call.seed_arg
        vdtype = default_vector_dtype(operator.dtype)
        self.tol = default_tol(operator.dtype, vdtype) if call.tol is None else call.tol
        self.k, self.max_iter, self.init_vec = call.k, max_iter, init_vec
        n_local = backend.local_size(operator.size)
        self.found = torch.zeros((self.k, n_local), dtype=vdtype, device=operator.device)
        self.thetas: list[float] = []
        self.residuals: list[float] = []
        self.flags: list[bool] = []
        self.total = 0  # products of the pairs found
        # The current pair: next iterate, products spent on it, last checked residual.
        self.v: torch.Tensor | None = None
        self.pos = 0
        self.previous = math.inf
        # Its last clean iterate (what a partial result adds to the pairs found).
        self.extra: _Pair | None = None

    def config(self) -> dict[str, Any]:
        """The arguments that determine the result (recorded in checkpoints)."""
        return {
            "max_iter": self.max_iter,
            "tol": self.tol,
            "seed": self.seed_arg,
            "dtype": self.found.dtype,
        }

    def used(self) -> int:
        return self.total + self.pos

    def done(self) -> bool:
        return len(self.thetas) >= self.k

    def context(self) -> str:
        return f" (pair {len(self.thetas) + 1} of {self.k})"

    def _deflate(self) -> torch.Tensor | None:
        i = len(self.thetas)
        return self.found[:i] if i > 0 else None

    def step(self) -> None:
        while True:
            v = self.v
            if v is None:  # start the next pair
                if self.init_vec is not None and not self.thetas:
                    v = self.init_vec
                else:
                    v = random_unit_vector(self, self.found.dtype, self._deflate())
                self.pos, self.previous = 0, math.inf
            pair = self._interval(v)
            if pair is None:
                return
            i = len(self.thetas)
            self.found[i] = pair.vector
            self.thetas.append(float(pair.theta))
            self.residuals.append(float(pair.residual))
            self.flags.append(pair.converged)
            self.total += pair.used
            self.v, self.pos, self.extra = None, 0, None
            if self.done():
                return

    def _interval(self, v: torch.Tensor) -> _Pair | None:
        """From iterate ``v``: up to ``_CHECK_EVERY`` products, then a check.

        Returns the finished pair, or None when the pair continues (its next iterate is
        then ``self.v``).
        """
        backend, deflate, tol = self.backend, self._deflate(), self.tol
        floor = eps(v.dtype) ** (1.0 / 3.0)
        thetas, residuals, vectors = [], [], []
        while True:
            w = self.apply(v, check=False)  # checked through theta and the residual below
            self.pos += 1
            theta = backend.dot(v, w)
            thetas.append(theta)
            residuals.append(backend.norm(w - theta * v))
            vectors.append(v)
            w = project_out(backend, deflate, w)
            v = w / backend.norm(w).clamp_min(torch.finfo(w.dtype).tiny)
            if len(thetas) == _CHECK_EVERY or self.pos == self.max_iter:
                break
        used = self.pos
        th = torch.stack(thetas).to("cpu", torch.float64)
        rs = torch.stack(residuals).to("cpu", torch.float64)
        finite = torch.isfinite(th) & torch.isfinite(rs)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            first_bad = used - len(thetas) + bad + 1
            self.extra = None
            if bad > 0:
                sc = float(
                    torch.clamp(th[:bad].abs(), min=floor * float(th[:bad].abs().max()))[bad - 1]
                )
                conv = bool(rs[bad - 1] <= tol * sc)
                self.extra = _Pair(th[bad - 1], vectors[bad - 1], rs[bad - 1], conv, first_bad - 1)
            self.fail(self.total + first_bad)
        scale = torch.clamp(th.abs(), min=floor * float(th.abs().max()))
        # Iterate to tol / 10 (so that deflating with this vector leaves later pairs
        # within tol); accept tol once the residual stagnates.
        ok = (rs <= _SAFETY * tol * scale).nonzero()
        if ok.numel() > 0:
            i = int(ok[0, 0])
            return _Pair(th[i], vectors[i], rs[i], True, used - len(thetas) + i + 1)
        last = float(rs[-1])
        conv = bool(last <= tol * float(scale[-1]))
        if conv and last >= 0.5 * self.previous:
            return _Pair(th[-1], vectors[-1], rs[-1], True, used)
        if used == self.max_iter:
            return _Pair(th[-1], vectors[-1], rs[-1], conv, used)
        self.v, self.previous = v, last
        self.extra = _Pair(th[-1], vectors[-1], rs[-1], conv, used)
        return None

    def _eigen(self, pairs: int, extra: _Pair | None, stop_reason: StopReason) -> EigenResult:
        vals, res, conv = self.thetas[:pairs], self.residuals[:pairs], self.flags[:pairs]
        vecs = [self.found[i] for i in range(pairs)]
        if extra is not None:
            vals, res = [*vals, float(extra.theta)], [*res, float(extra.residual)]
            conv = [*conv, extra.converged]
            vecs.append(extra.vector)
        spent = self.total + (extra.used if extra is not None else 0)
        return EigenResult(
            eigenvalues=torch.tensor(vals, dtype=torch.float64),
            eigenvectors=torch.stack(vecs) if vecs else self.found[:0],
            residuals=torch.tensor(res, dtype=torch.float64),
            converged=torch.tensor(conv, dtype=torch.bool),
            iterations=spent,
            num_matvecs=spent,
            which="LM",
            tol=self.tol,
            seed=None if self.init_vec is not None else self.seed,
            method=self.algorithm,
            stop_reason=stop_reason,
        )

    def partial(self, stop_reason: StopReason) -> EigenResult | None:
        if not self.thetas and self.extra is None:
            return None
        return self._eigen(len(self.thetas), self.extra, stop_reason)

    def result(self) -> EigenResult:
        return self._eigen(self.k, None, "converged" if all(self.flags) else "max_iter")

    def state_dict(self) -> dict[str, Any]:
        i = len(self.thetas)
        current = None
        if self.v is not None:
            current = {"v": self.v.cpu(), "used": self.pos, "previous": self.previous}
        return {
            "found": self.found[:i].cpu(),
            "thetas": list(self.thetas),
            "residuals": list(self.residuals),
            "flags": list(self.flags),
            "total": self.total,
            "current": current,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.thetas = list(state["thetas"])
        self.residuals, self.flags = list(state["residuals"]), list(state["flags"])
        self.found[: len(self.thetas)] = state["found"].to(self.found.device)
        self.total = int(state["total"])
        current = state["current"]
        if current is not None:
            self.v = current["v"].to(self.op.device)
            self.pos, self.previous = int(current["used"]), float(current["previous"])

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
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hessian_eigenthings._compat import legacy_keywords, power_iteration_momentum
from hessian_eigenthings.algorithms._deadline import Deadline
from hessian_eigenthings.algorithms._estimator_utils import agree_seed
from hessian_eigenthings.algorithms.checkpoint import (
    Checkpointer,
    generator_state,
    restore_generator,
)
from hessian_eigenthings.algorithms.lanczos import default_tol, default_vector_dtype
from hessian_eigenthings.algorithms.results import EigenResult
from hessian_eigenthings.backends.base import LinAlgBackend, fresh_seed
from hessian_eigenthings.errors import NonFiniteError
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["deflated_power_iteration", "power_iteration_one"]

# Iterations between convergence checks (one host sync each).
_CHECK_EVERY = 4
# Pairs are iterated to _SAFETY * tol unless the residual stagnates below tol.
_SAFETY = 0.1


def _check_common(
    operator: CurvatureOperator, max_iter: int, tol: float | None, seed: int | None
) -> None:
    if not isinstance(operator, CurvatureOperator):
        raise TypeError(
            f"Power iteration expects a CurvatureOperator, got {type(operator).__name__}. "
            "Wrap a function v -> A v with LambdaOperator(matvec_fn, size, dtype=...)."
        )
    if not operator.symmetric:
        raise ValueError(
            f"Power iteration's Rayleigh quotients and residuals assume a symmetric "
            f"operator, but {operator!r} has symmetric=False; construct it with "
            "symmetric=True if it is symmetric."
        )
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int (matvecs), got {max_iter!r}.")
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}.")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}.")


def _project_out(
    backend: LinAlgBackend, basis: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """``(I - U U^T) x`` by two classical Gram-Schmidt passes (rows of ``basis`` = U)."""
    if basis is None or basis.shape[0] == 0:
        return x
    for _ in range(2):
        x = x - backend.block_dot(basis, x) @ basis
    return x


@dataclass
class _Pair:
    """Outcome of one power iteration (float64 CPU scalars, the unit vector on device)."""

    theta: torch.Tensor
    vector: torch.Tensor
    residual: torch.Tensor
    converged: bool
    used: int
    stopped: bool = False  # cut short by the time limit


class _NonFinite(Exception):
    """A product of the current pair was non-finite (internal; see ``_run_pairs``)."""

    def __init__(self, clean: _Pair | None, first_bad: int, cause: NonFiniteError | None):
        super().__init__("non-finite product")
        self.clean, self.first_bad, self.cause = clean, first_bad, cause


def _iterate(
    operator: CurvatureOperator,
    backend: LinAlgBackend,
    v: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    deflate: torch.Tensor | None,
    used: int = 0,
    previous: float = math.inf,
    on_check: Callable[[torch.Tensor, int, float], bool] | None = None,
) -> _Pair:
    """Run power iteration from unit ``v`` (``used`` products already spent on it).

    ``on_check(v, used, previous)`` is called after every convergence check that does not
    stop, with the complete state of the iteration; returning True stops it (time limit).
    """
    floor = float(torch.finfo(v.dtype).eps) ** (1.0 / 3.0)
    thetas, residuals, vectors = [], [], []
    while True:
        try:
            w = operator.matvec(v)
        except NonFiniteError as err:
            raise _NonFinite(None, used + 1, err) from err
        used += 1
        theta = backend.dot(v, w)
        residual = backend.norm(w - theta * v)
        thetas.append(theta)
        residuals.append(residual)
        vectors.append(v)
        w = _project_out(backend, deflate, w)
        v = w / backend.norm(w).clamp_min(torch.finfo(w.dtype).tiny)
        if len(thetas) == _CHECK_EVERY or used == max_iter:
            th = torch.stack(thetas).to("cpu", torch.float64)
            rs = torch.stack(residuals).to("cpu", torch.float64)
            finite = torch.isfinite(th) & torch.isfinite(rs)
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
                first_bad = used - len(thetas) + bad + 1
                clean = None
                if bad > 0:
                    sc = float(
                        torch.clamp(th[:bad].abs(), min=floor * float(th[:bad].abs().max()))[
                            bad - 1
                        ]
                    )
                    clean = _Pair(
                        th[bad - 1],
                        vectors[bad - 1],
                        rs[bad - 1],
                        bool(rs[bad - 1] <= tol * sc),
                        first_bad - 1,
                    )
                raise _NonFinite(clean, first_bad, None)
            scale = torch.clamp(th.abs(), min=floor * float(th.abs().max()))
            # Iterate to tol / 10 (so that deflating with this vector leaves later pairs
            # within tol); accept tol once the residual stagnates.
            ok = (rs <= _SAFETY * tol * scale).nonzero()
            if ok.numel() > 0:
                i = int(ok[0, 0])
                return _Pair(th[i], vectors[i], rs[i], True, used - len(thetas) + i + 1)
            last = float(rs[-1])
            if last <= tol * float(scale[-1]) and last >= 0.5 * previous:
                return _Pair(th[-1], vectors[-1], rs[-1], True, used)
            previous = last
            if used == max_iter:
                return _Pair(
                    th[-1], vectors[-1], rs[-1], bool(last <= tol * float(scale[-1])), used
                )
            if on_check is not None and on_check(v, used, previous):
                conv = bool(last <= tol * float(scale[-1]))
                return _Pair(th[-1], vectors[-1], rs[-1], conv, used, stopped=True)
            thetas, residuals, vectors = [], [], []


def _start_vector(
    operator: CurvatureOperator,
    backend: LinAlgBackend,
    generator: torch.Generator,
    dtype: torch.dtype,
    deflate: torch.Tensor | None,
) -> torch.Tensor:
    v = backend.random(operator.size, generator=generator, dtype=dtype, device=operator.device)
    v = _project_out(backend, deflate, v)
    return v / backend.norm(v)


def _run_pairs(
    operator: CurvatureOperator,
    backend: LinAlgBackend,
    *,
    k: int,
    max_iter: int,
    tol: float,
    seed: int,
    vdtype: torch.dtype,
    init_vec: torch.Tensor | None,
    method: str,
    checkpointer: Checkpointer | None,
    deadline: Deadline,
) -> EigenResult:
    """Find ``k`` pairs one after another (the shared driver of both public functions)."""
    n = operator.size
    gen = backend.generator(seed, operator.device)
    found = torch.zeros((k, backend.local_size(n)), dtype=vdtype, device=operator.device)
    thetas: list[float] = []
    residuals: list[float] = []
    flags: list[bool] = []
    total = 0
    resume: dict[str, Any] | None = None
    if checkpointer is not None:
        saved = checkpointer.load()
        if saved is not None:
            found[: len(saved["thetas"])] = saved["found"].to(operator.device)
            thetas, residuals, flags = (
                list(saved["thetas"]),
                list(saved["residuals"]),
                list(saved["flags"]),
            )
            total, seed = int(saved["total"]), int(saved["seed"])
            restore_generator(gen, saved["generator"])
            resume = saved["current"]

    def result(pairs: int, extra: _Pair | None, stop_reason: str) -> EigenResult:
        vals, res, conv = thetas[:pairs], residuals[:pairs], flags[:pairs]
        vecs = [found[i] for i in range(pairs)]
        if extra is not None:
            vals, res, conv = (
                [*vals, float(extra.theta)],
                [*res, float(extra.residual)],
                [*conv, extra.converged],
            )
            vecs.append(extra.vector)
        spent = total + (extra.used if extra is not None else 0)
        return EigenResult(
            eigenvalues=torch.tensor(vals, dtype=torch.float64),
            eigenvectors=torch.stack(vecs) if vecs else found[:0],
            residuals=torch.tensor(res, dtype=torch.float64),
            converged=torch.tensor(conv, dtype=torch.bool),
            iterations=spent,
            num_matvecs=spent,
            which="LM",
            tol=tol,
            seed=None if init_vec is not None else seed,
            method=method,
            stop_reason=stop_reason,
        )

    stopped: _Pair | None = None
    for i in range(len(thetas), k):
        deflate = found[:i] if i > 0 else None

        def on_check(
            v: torch.Tensor, used: int, previous: float, i: int = i, total: int = total
        ) -> bool:
            def state() -> dict[str, Any]:
                return {
                    "found": found[:i].cpu(),
                    "thetas": thetas,
                    "residuals": residuals,
                    "flags": flags,
                    "total": total,
                    "seed": seed,
                    "generator": generator_state(gen),
                    "current": {"v": v.cpu(), "used": used, "previous": previous},
                }

            if deadline.expired(operator.device):
                if checkpointer is not None:
                    checkpointer.save(total + used, state())
                return True
            if checkpointer is not None:
                checkpointer.maybe_save(total + used, state)
            return False

        if resume is not None:
            v = resume["v"].to(operator.device)
            used0, previous0 = int(resume["used"]), float(resume["previous"])
            resume = None
        else:
            used0, previous0 = 0, math.inf
            if init_vec is not None and i == 0:
                v = init_vec
            else:
                v = _start_vector(operator, backend, gen, vdtype, deflate)
        try:
            pair = _iterate(
                operator,
                backend,
                v,
                max_iter=max_iter,
                tol=tol,
                deflate=deflate,
                used=used0,
                previous=previous0,
                on_check=on_check,
            )
        except _NonFinite as bad:
            partial = result(i, bad.clean, "non_finite") if (i > 0 or bad.clean) else None
            what = (
                f"{method} product {total + bad.first_bad} failed: {bad.cause}"
                if bad.cause is not None
                else f"{type(operator).__name__}.matvec returned non-finite values (inf/nan) "
                f"at product {total + bad.first_bad} of this {method} run"
            )
            raise NonFiniteError(
                f"{what} (pair {i + 1} of {k}); err.partial holds the {i} pairs found before "
                "it and the last clean iterate of the current pair"
                + ("" if partial is not None else " (None: nothing clean yet)")
                + ". Check the model for overflow (e.g. a bf16 model) or a bad batch.",
                partial=partial,
                matvec=total + bad.first_bad,
                batch_index=None if bad.cause is None else bad.cause.batch_index,
                param_names=() if bad.cause is None else bad.cause.param_names,
            ) from bad.cause
        if pair.stopped:
            stopped = pair
            break
        found[i] = pair.vector
        thetas.append(float(pair.theta))
        residuals.append(float(pair.residual))
        flags.append(pair.converged)
        total += pair.used
    if stopped is not None:
        return result(len(thetas), stopped, "time_limit")
    if checkpointer is not None:
        checkpointer.finish()
    return result(k, None, "converged" if all(flags) else "max_iter")


@legacy_keywords({"init": "init_vec"}, power_iteration_momentum)
def power_iteration_one(
    operator: CurvatureOperator,
    *,
    max_iter: int = 1000,
    tol: float | None = None,
    seed: int | None = None,
    backend: LinAlgBackend | None = None,
    init_vec: torch.Tensor | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    time_limit: float | None = None,
) -> EigenResult:
    """The eigenpair of largest magnitude by power iteration.

    Args:
        operator: Symmetric curvature operator.
        max_iter: Budget of matrix-vector products.
        tol: Relative residual tolerance (see the module docstring); default
            :func:`~hessian_eigenthings.algorithms.lanczos.default_tol`.
        seed: Seed of the random start vector; ``None`` draws a fresh one (rank 0's under
            a distributed backend).
        backend: Vector backend; default ``operator.backend``.
        init_vec: Start vector of shape ``(size,)`` instead of a random one (not
            modified; normalised internally).
        checkpoint: Path of a checkpoint file (written at convergence checks); a call with
            the same arguments resumes from it, bit for bit. Deleted when done, kept when
            ``time_limit`` stops the call. Not available with ``init_vec``.
        checkpoint_every: Write every this many products (rounded up to a check).
        checkpoint_seconds: Write when this many seconds passed since the last write.
        time_limit: Wall-clock seconds; once passed (checked every 4 products), the
            current iterate is returned with its true residual, honest ``converged``
            flag and ``stop_reason="time_limit"``.

    Returns:
        An :class:`EigenResult` with ``k = 1``; ``residuals`` holds the true
        ``||A v - theta v||`` of the returned pair. ``eigenvalue, eigenvector = result``
        unpacks it (shapes ``(1,)`` and ``(1, n)``).

    Raises:
        TypeError, ValueError: Bad operator, budget, tolerance, seed or start vector.
        NonFiniteError: A product was inf/nan (``err.partial``: the last clean iterate).
    """
    _check_common(operator, max_iter, tol, seed)
    backend = backend or operator.backend
    vdtype = default_vector_dtype(operator.dtype)
    tol_ = float(tol) if tol is not None else default_tol(operator.dtype, vdtype)
    seed_ = agree_seed(fresh_seed() if seed is None else seed, backend, operator.device)
    v0 = None
    if init_vec is not None:
        if not isinstance(init_vec, torch.Tensor) or init_vec.shape != (
            backend.local_size(operator.size),
        ):
            got = tuple(init_vec.shape) if isinstance(init_vec, torch.Tensor) else init_vec
            raise ValueError(f"init_vec must be a tensor of shape ({operator.size},), got {got!r}.")
        if checkpoint is not None:
            raise ValueError(
                "checkpoint= cannot be combined with init_vec (the start vector is not "
                "recorded); drop one of them."
            )
        v0 = init_vec.detach().to(device=operator.device, dtype=vdtype)
        norm = backend.norm(v0)
        if not bool(norm > 0):
            raise ValueError("init_vec must be nonzero.")
        v0 = v0 / norm
    deadline = Deadline(time_limit)
    checkpointer = Checkpointer.create(
        checkpoint,
        checkpoint_every,
        checkpoint_seconds,
        algorithm="power_iteration",
        operator=operator,
        backend=backend,
        config={"max_iter": max_iter, "tol": tol_, "seed": seed, "dtype": vdtype},
    )
    return _run_pairs(
        operator,
        backend,
        k=1,
        max_iter=max_iter,
        tol=tol_,
        seed=seed_,
        vdtype=vdtype,
        init_vec=v0,
        method="power_iteration",
        checkpointer=checkpointer,
        deadline=deadline,
    )


@legacy_keywords({"num_eigs": "k"}, power_iteration_momentum)
def deflated_power_iteration(
    operator: CurvatureOperator,
    k: int = 1,
    *,
    max_iter: int = 1000,
    tol: float | None = None,
    seed: int | None = None,
    backend: LinAlgBackend | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    time_limit: float | None = None,
) -> EigenResult:
    """``k`` eigenpairs of largest magnitude by power iteration with projection deflation.

    Pair ``i`` is found by power iteration on ``P_i A`` with ``P_i = I - U_i U_i^T`` and
    ``U_i`` the unit eigenvectors found before it. Its residual is measured against ``A``
    itself, ``||A v_i - theta_i v_i||`` (true, not a bound), so an inaccurate earlier
    vector cannot make a later pair look converged.

    Args:
        operator: Symmetric curvature operator.
        k: Number of eigenpairs, ``1 <= k <= size``.
        max_iter: Budget of matrix-vector products *per eigenpair*.
        tol: Relative residual tolerance; default
            :func:`~hessian_eigenthings.algorithms.lanczos.default_tol`.
        seed: Seed of the random start vectors; ``None`` draws a fresh one (rank 0's
            under a distributed backend).
        backend: Vector backend; default ``operator.backend``.
        checkpoint: Path of a checkpoint file (pairs found, current iterate, generator
            state; written at convergence checks); a call with the same arguments resumes
            from it, bit for bit. Deleted when done, kept when ``time_limit`` stops it.
        checkpoint_every: Write every this many products (rounded up to a check).
        checkpoint_seconds: Write when this many seconds passed since the last write.
        time_limit: Wall-clock seconds; once passed, the pairs found so far plus the
            current iterate are returned (fewer than ``k`` rows possible), with true
            residuals, honest flags and ``stop_reason="time_limit"``.

    Returns:
        An :class:`EigenResult` in the order found (decreasing magnitude when every pair
        converged); ``converged[i]`` is False for a pair that used its whole budget.
        ``iterations`` and ``num_matvecs`` are totals over all pairs.

    Raises:
        NonFiniteError: A product was inf/nan (``err.partial``: the pairs found before it).
    """
    _check_common(operator, max_iter, tol, seed)
    n = operator.size
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an int with 1 <= k <= operator.size = {n}, got {k!r}.")
    backend = backend or operator.backend
    vdtype = default_vector_dtype(operator.dtype)
    tol_ = float(tol) if tol is not None else default_tol(operator.dtype, vdtype)
    seed_ = agree_seed(fresh_seed() if seed is None else seed, backend, operator.device)
    deadline = Deadline(time_limit)
    checkpointer = Checkpointer.create(
        checkpoint,
        checkpoint_every,
        checkpoint_seconds,
        algorithm="deflated_power_iteration",
        operator=operator,
        backend=backend,
        config={"k": k, "max_iter": max_iter, "tol": tol_, "seed": seed, "dtype": vdtype},
    )
    return _run_pairs(
        operator,
        backend,
        k=k,
        max_iter=max_iter,
        tol=tol_,
        seed=seed_,
        vdtype=vdtype,
        init_vec=None,
        method="deflated_power_iteration",
        checkpointer=checkpointer,
        deadline=deadline,
    )

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
"""

from __future__ import annotations

import math

import torch

from hessian_eigenthings.algorithms.lanczos import default_tol, default_vector_dtype
from hessian_eigenthings.algorithms.results import EigenResult
from hessian_eigenthings.backends.base import LinAlgBackend, fresh_seed
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


def _iterate(
    operator: CurvatureOperator,
    backend: LinAlgBackend,
    v: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    deflate: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, int]:
    """Run power iteration from unit ``v``; return ``(theta, v, residual, converged, used)``."""
    floor = float(torch.finfo(v.dtype).eps) ** (1.0 / 3.0)
    thetas, residuals, vectors = [], [], []
    used = 0
    previous = math.inf
    while True:
        w = operator.matvec(v)
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
            if not (torch.isfinite(th).all() and torch.isfinite(rs).all()):
                raise FloatingPointError(
                    f"{type(operator).__name__}.matvec produced non-finite values (inf/nan) "
                    "during power iteration; check the model for overflow."
                )
            scale = torch.clamp(th.abs(), min=floor * float(th.abs().max()))
            # Iterate to tol / 10 (so that deflating with this vector leaves later pairs
            # within tol); accept tol once the residual stagnates.
            ok = (rs <= _SAFETY * tol * scale).nonzero()
            if ok.numel() > 0:
                i = int(ok[0, 0])
                return th[i], vectors[i], rs[i], True, used - len(thetas) + i + 1
            last = float(rs[-1])
            if last <= tol * float(scale[-1]) and last >= 0.5 * previous:
                return th[-1], vectors[-1], rs[-1], True, used
            previous = last
            if used == max_iter:
                return th[-1], vectors[-1], rs[-1], bool(last <= tol * float(scale[-1])), used
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


def power_iteration_one(
    operator: CurvatureOperator,
    *,
    max_iter: int = 1000,
    tol: float | None = None,
    seed: int | None = None,
    backend: LinAlgBackend | None = None,
    init_vec: torch.Tensor | None = None,
) -> EigenResult:
    """The eigenpair of largest magnitude by power iteration.

    Args:
        operator: Symmetric curvature operator.
        max_iter: Budget of matrix-vector products.
        tol: Relative residual tolerance (see the module docstring); default
            :func:`~hessian_eigenthings.algorithms.lanczos.default_tol`.
        seed: Seed of the random start vector; ``None`` draws a fresh one.
        backend: Vector backend; default ``operator.backend``.
        init_vec: Start vector of shape ``(size,)`` instead of a random one (not
            modified; normalised internally).

    Returns:
        An :class:`EigenResult` with ``k = 1``; ``residuals`` holds the true
        ``||A v - theta v||`` of the returned pair. ``eigenvalue, eigenvector = result``
        unpacks it (shapes ``(1,)`` and ``(1, n)``).

    Raises:
        TypeError, ValueError: Bad operator, budget, tolerance, seed or start vector.
    """
    _check_common(operator, max_iter, tol, seed)
    backend = backend or operator.backend
    vdtype = default_vector_dtype(operator.dtype)
    tol_ = float(tol) if tol is not None else default_tol(operator.dtype, vdtype)
    seed_ = fresh_seed() if seed is None else seed
    if init_vec is not None:
        if not isinstance(init_vec, torch.Tensor) or init_vec.shape != (
            backend.local_size(operator.size),
        ):
            got = tuple(init_vec.shape) if isinstance(init_vec, torch.Tensor) else init_vec
            raise ValueError(f"init_vec must be a tensor of shape ({operator.size},), got {got!r}.")
        v = init_vec.detach().to(device=operator.device, dtype=vdtype)
        norm = backend.norm(v)
        if not bool(norm > 0):
            raise ValueError("init_vec must be nonzero.")
        v = v / norm
    else:
        gen = backend.generator(seed_, operator.device)
        v = _start_vector(operator, backend, gen, vdtype, None)
    theta, vec, res, conv, used = _iterate(
        operator, backend, v, max_iter=max_iter, tol=tol_, deflate=None
    )
    return EigenResult(
        eigenvalues=theta.reshape(1),
        eigenvectors=vec.reshape(1, -1),
        residuals=res.reshape(1),
        converged=torch.tensor([conv]),
        iterations=used,
        num_matvecs=used,
        which="LM",
        tol=tol_,
        seed=None if init_vec is not None else seed_,
        method="power_iteration",
    )


def deflated_power_iteration(
    operator: CurvatureOperator,
    k: int = 1,
    *,
    max_iter: int = 1000,
    tol: float | None = None,
    seed: int | None = None,
    backend: LinAlgBackend | None = None,
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
        seed: Seed of the random start vectors; ``None`` draws a fresh one.
        backend: Vector backend; default ``operator.backend``.

    Returns:
        An :class:`EigenResult` in the order found (decreasing magnitude when every pair
        converged); ``converged[i]`` is False for a pair that used its whole budget.
        ``iterations`` and ``num_matvecs`` are totals over all pairs.
    """
    _check_common(operator, max_iter, tol, seed)
    n = operator.size
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an int with 1 <= k <= operator.size = {n}, got {k!r}.")
    backend = backend or operator.backend
    vdtype = default_vector_dtype(operator.dtype)
    tol_ = float(tol) if tol is not None else default_tol(operator.dtype, vdtype)
    seed_ = fresh_seed() if seed is None else seed
    gen = backend.generator(seed_, operator.device)
    found = torch.zeros((k, backend.local_size(n)), dtype=vdtype, device=operator.device)
    thetas, residuals, flags = [], [], []
    total = 0
    for i in range(k):
        deflate = found[:i] if i > 0 else None
        v = _start_vector(operator, backend, gen, vdtype, deflate)
        theta, vec, res, conv, used = _iterate(
            operator, backend, v, max_iter=max_iter, tol=tol_, deflate=deflate
        )
        found[i] = vec
        thetas.append(float(theta))
        residuals.append(float(res))
        flags.append(conv)
        total += used
    return EigenResult(
        eigenvalues=torch.tensor(thetas, dtype=torch.float64),
        eigenvectors=found,
        residuals=torch.tensor(residuals, dtype=torch.float64),
        converged=torch.tensor(flags),
        iterations=total,
        num_matvecs=total,
        which="LM",
        tol=tol_,
        seed=seed_,
        method="deflated_power_iteration",
    )

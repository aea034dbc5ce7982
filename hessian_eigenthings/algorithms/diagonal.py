r"""Stochastic estimates of ``diag(A)`` with per-entry standard errors.

``"hutchinson"`` (Bekas, Kokiopoulou & Saad 2007): with probes ``omega_k`` whose entries
are independent with mean 0 and variance 1,

.. math::

    \hat d = \frac{1}{m} \sum_{k=1}^m \omega_k \odot A \omega_k,
    \qquad \mathrm{se}_j = \frac{s_{m,j}}{\sqrt{m}},

unbiased since ``E[omega_j (A omega)_j] = A_jj``; ``s_{m,j}`` is the sample standard
deviation of entry ``j`` over the probes. With Rademacher probes entry ``j`` has variance
``sum_{l != j} A_jl^2 / m`` (for Rademacher probes Bekas et al.'s normalisation by
``sum_k omega_k \odot omega_k = m`` is the same estimator).

``"xdiag"`` (Epperly, Tropp & Webber 2024, "XTrace: Making the most of every sample in
stochastic trace estimation", SIAM J. Matrix Anal. Appl., Sec. 5): the exchangeable
diagonal estimator. With ``s = m // 2`` probes, ``Y = A Omega = Q R`` and the
leave-one-out projectors ``\Pi_(i) = Q (I - s_i s_i^T) Q^T``
(``s_i = R^{-T} e_i / ||R^{-T} e_i||``),

.. math::

    \hat d^{(i)} = \mathrm{diag}(\Pi_{(i)} A) + \omega_i \odot (I - \Pi_{(i)}) A \omega_i,
    \qquad \hat d = \frac{1}{s} \sum_i \hat d^{(i)},

each term unbiased, and, with ``Z = A Q`` and ``Q^T A Omega = R``,

.. math::

    \hat d^{(i)} = \mathrm{diag}(Q Z^\top) - (Q s_i) \odot (Z s_i)
    + (s_i^\top R e_i) \, \omega_i \odot Q s_i,

since ``Y e_i - Q R e_i = 0``: only the left-out direction ``Q s_i`` remains of
``(I - \Pi_(i)) A omega_i``.

The per-entry error estimate is the standard error of the mean of the ``\hat d^{(i)}``
(the diagonal analogue of XTrace's error estimate). If the sketch is numerically rank
deficient (singular values of ``R`` below ``s * eps * sigma_max``), the leave-one-out
projectors are ill-defined and XDiag falls back to the deflated Hutchinson diagonal
``diag(Q_r Q_r^T A)`` plus fresh probes on the residual, with the same budget.
"""

from __future__ import annotations

import math

import torch

from hessian_eigenthings.algorithms._estimator_utils import (
    apply_columns,
    check_block_size,
    check_distribution,
    check_num_matvecs,
    check_operator,
    check_single_device,
    check_sketch_options,
    draw_columns,
    loo_directions,
    resolve_seed,
    working_dtype,
)
from hessian_eigenthings.algorithms.estimator_results import DiagonalResult
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["DIAGONAL_METHODS", "diagonal"]

DIAGONAL_METHODS = ("hutchinson", "xdiag")
_MIN_MATVECS = {"hutchinson": 2, "xdiag": 4}


def diagonal(
    operator: CurvatureOperator,
    num_matvecs: int = 100,
    *,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    seed: int | None = None,
    sketch_device: torch.device | str | None = None,
    block_size: int = 32,
    backend: LinAlgBackend | None = None,
) -> DiagonalResult:
    """Estimate ``diag(A)`` with a per-entry standard error.

    What the error bars cover: for ``"hutchinson"`` the ``m`` per-probe vectors are
    i.i.d., so ``stderr[j]`` is the standard error of entry ``j`` (Student-t small-sample
    effects aside). For ``"xdiag"`` it is the leave-one-out spread of the ``s`` exchangeable
    (identically distributed, unbiased, dependent) terms, an estimate like XTrace's.
    An entry whose error estimate is exactly 0 (e.g. a diagonal ``A`` probed with
    Rademacher vectors) is exact.

    Memory: ``"hutchinson"`` holds ``O(n * block_size)`` plus three float64 ``n``-vectors.
    ``"xdiag"`` holds the sketch ``Omega``, ``Q``, ``A Q`` and the ``s`` leave-one-out
    vectors: about ``4 n s = 2 n m`` numbers, on ``sketch_device`` if given.

    Args:
        operator: Symmetric operator ``A``.
        num_matvecs: Budget of operator products (at least 2 for Hutchinson, 4 for XDiag).
        method: ``"hutchinson"`` (default) or ``"xdiag"``.
        distribution: ``"rademacher"`` (default: far lower variance for diagonals) or
            ``"gaussian"``.
        seed: ``None`` draws a fresh seed (recorded in the result); an int reproduces.
        sketch_device: Device that holds the XDiag sketch; default the operator's.
        block_size: Probes per ``operator.matmat`` call.
        backend: Vector arithmetic; default ``operator.backend``. XDiag needs whole
            vectors; Hutchinson works on shards (every entry is local).

    Returns:
        A :class:`DiagonalResult` with float64 ``estimate`` and ``stderr`` of shape
        ``(n_local,)`` on the sketch device (the operator's device by default).

    Raises:
        ValueError: Unknown ``method`` or ``distribution``, or ``num_matvecs`` below the
            method's minimum.
    """
    if method not in DIAGONAL_METHODS:
        raise ValueError(f"Unknown diagonal method {method!r}; expected one of {DIAGONAL_METHODS}.")
    operator = check_operator(operator, "diagonal")
    m = check_num_matvecs(num_matvecs, _MIN_MATVECS[method], method)
    distribution = check_distribution(distribution)
    block_size = check_block_size(block_size)
    _, store = check_sketch_options(None, sketch_device, operator)
    seed = resolve_seed(seed)
    backend = backend if backend is not None else operator.backend
    gen = backend.generator(seed, operator.device)
    if method == "hutchinson":
        est, se, used, details = _hutchinson_diagonal(
            operator, backend, m, gen, distribution, block_size
        )
    else:
        check_single_device(backend, operator, "diagonal(method='xdiag')")
        est, se, used, details = _xdiag(operator, backend, m, gen, distribution, store, block_size)
    return DiagonalResult(
        estimate=est,
        stderr=se,
        num_matvecs=used,
        operator_size=operator.size,
        method=method,
        distribution=distribution,
        seed=seed,
        details=details,
    )


def _hutchinson_diagonal(
    operator: CurvatureOperator,
    backend: LinAlgBackend,
    m: int,
    gen: torch.Generator,
    distribution: str,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, int]]:
    """Mean and standard error of ``omega_k * A omega_k`` (blockwise Chan et al. merge)."""
    dtype = working_dtype(operator)
    n_local = backend.local_size(operator.size)
    mean = torch.zeros(n_local, dtype=torch.float64, device=operator.device)
    m2 = torch.zeros_like(mean)  # sum of squared deviations from the mean
    count = 0
    for start in range(0, m, block_size):
        b = min(block_size, m - start)
        omega = draw_columns(
            backend, operator, b, generator=gen, dtype=dtype, distribution=distribution
        )
        X = (omega * operator.matmat(omega)).to(torch.float64)
        block_mean = X.mean(dim=1)
        block_m2 = ((X - block_mean[:, None]) ** 2).sum(dim=1)
        delta = block_mean - mean
        total = count + b
        mean = mean + delta * (b / total)
        m2 = m2 + block_m2 + delta * delta * (count * b / total)
        count = total
    stderr = torch.sqrt(m2 / (m - 1)) / math.sqrt(m)
    return mean, stderr, m, {"num_probes": m}


def _xdiag(
    operator: CurvatureOperator,
    backend: LinAlgBackend,
    m: int,
    gen: torch.Generator,
    distribution: str,
    store: torch.device,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, int]]:
    """XDiag with ``s = min(m // 2, n)`` probes; see the module docstring."""
    n = operator.size
    s = min(m // 2, n)
    if s < 2:
        raise ValueError(f"xdiag needs an operator of size >= 2, got size {n}.")
    dtype = working_dtype(operator)
    omega = draw_columns(
        backend, operator, s, generator=gen, dtype=dtype, distribution=distribution
    ).to(store)
    Y = apply_columns(operator, omega, block_size)
    Q, R = torch.linalg.qr(Y)
    del Y
    R64 = R.to(torch.float64)
    svals = torch.linalg.svdvals(R64)
    tol = s * float(torch.finfo(dtype).eps) * float(svals[0])
    rank = int((svals > tol).sum())
    if rank < s:
        del omega
        return _xdiag_rank_deficient(operator, backend, Q, R64, rank, gen, distribution, block_size)
    Z = apply_columns(operator, Q, block_size)
    S = loo_directions(R64).to(Q.dtype)
    QS = Q @ S
    ZS = Z @ S
    dQZ = (Q * Z).sum(dim=1)
    coef = (S.to(torch.float64) * R64).sum(0).to(Q.dtype)  # s_i^T R e_i
    del Z
    # Y e_i - Q R e_i vanishes (Y = Q R): only the left-out direction Q s_i remains.
    D = (omega * (QS * coef) + dQZ[:, None] - QS * ZS).to(torch.float64)
    used = 2 * s
    estimate = D.mean(dim=1)
    stderr = D.std(dim=1, correction=1) / math.sqrt(s)
    return estimate, stderr, used, {"sketch_size": s, "sketch_rank": rank}


def _xdiag_rank_deficient(
    operator: CurvatureOperator,
    backend: LinAlgBackend,
    Q: torch.Tensor,
    R64: torch.Tensor,
    rank: int,
    gen: torch.Generator,
    distribution: str,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, int]]:
    """Deflated Hutchinson diagonal on a numerically rank-deficient sketch.

    As in XTrace's fallback: with ``r' = min(r, s - 2)`` leading directions ``Q_r`` of the
    sketch, ``diag(A) = diag(Q_r Q_r^T A) + diag((I - Q_r Q_r^T) A)``; the first term is
    exact (``r'`` products), the second is estimated with the ``s - r'`` remaining products
    on fresh probes, ``g * (I - Q_r Q_r^T) A g``, whose per-entry spread gives the error.
    """
    s = R64.shape[0]
    keep = min(rank, s - 2)
    U, _, _ = torch.linalg.svd(R64)
    Qr = Q @ U[:, :keep].to(Q.dtype)
    Zr = apply_columns(operator, Qr, block_size)
    low = (Qr * Zr).sum(dim=1).to(torch.float64)
    del Zr
    fresh = s - keep
    X = torch.empty((Q.shape[0], fresh), dtype=torch.float64, device=Q.device)
    for start in range(0, fresh, block_size):
        b = min(block_size, fresh - start)
        G = draw_columns(
            backend, operator, b, generator=gen, dtype=Q.dtype, distribution=distribution
        ).to(Q.device)
        AG = operator.matmat(G.to(operator.device)).to(Q.device)
        X[:, start : start + b] = (G * (AG - Qr @ (Qr.T @ AG))).to(torch.float64)
    estimate = low + X.mean(dim=1)
    stderr = X.std(dim=1, correction=1) / math.sqrt(fresh)
    used = s + keep + fresh
    return estimate, stderr, used, {"sketch_size": s, "sketch_rank": rank}

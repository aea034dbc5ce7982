r"""Plain m-step Lanczos: the tridiagonal projection behind Stochastic Lanczos Quadrature.

Starting from ``q_1 = v_0 / ||v_0||``, the symmetric Lanczos recurrence (Lanczos 1950;
Golub & Van Loan, *Matrix Computations*, Alg. 10.1.1)

.. math::

    \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}, \qquad
    \alpha_j = q_j^\top A q_j, \qquad \beta_j = \| A q_j - \alpha_j q_j
    - \beta_{j-1} q_{j-1} \|,

builds an orthonormal basis ``Q_m = [q_1, ..., q_m]`` of the Krylov space
``span{v_0, A v_0, ..., A^{m-1} v_0}`` with ``Q_m^T A Q_m = T_m``, the symmetric
tridiagonal matrix with diagonal ``alpha`` and off-diagonal ``beta_1..beta_{m-1}``, and
``A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^T``.

In floating point the three-term recurrence loses orthogonality as soon as a Ritz value
converges, which produces spurious ("ghost") copies of eigenvalues. With
``reorthogonalize=True`` (default) every new vector is orthogonalised against all
previous ones twice with classical Gram-Schmidt ("twice is enough": Giraud, Langou &
Rozloznik 2005), which keeps ``Q_m`` orthonormal to working precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hessian_eigenthings.algorithms._validation import check_int, check_operator
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.backends.devices import same_device
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["LanczosTridiag", "lanczos_tridiagonal", "tridiagonalize"]

# Steps between the (single, scalar) host synchronisations that test for breakdown.
_CHECK_EVERY = 8
# Breakdown when beta_j <= _BREAKDOWN_FACTOR * eps(dtype) * (||A q_j|| + beta_{j-1}), i.e.
# when what is left of A q_j after orthogonalisation is at the rounding level of A q_j.
_BREAKDOWN_FACTOR = 100.0


@dataclass(eq=False)
class LanczosTridiag:
    """Result of :func:`lanczos_tridiagonal`.

    Attributes:
        alphas: Diagonal of ``T``, shape ``(iterations,)``, float64, on the vectors' device.
        betas: Off-diagonal of ``T``, shape ``(iterations - 1,)``, float64.
        basis: Lanczos vectors as rows, shape ``(iterations, n_local)`` in the vector dtype,
            or ``None`` when ``reorthogonalize=False`` (only two vectors are kept then).
        last_beta: ``beta_m = ||A q_m - alpha_m q_m - beta_{m-1} q_{m-1}||`` (0-d float64),
            the coupling to the next Lanczos vector; ``~0`` means the Krylov space is
            invariant and the Ritz values are exact eigenvalues.
        iterations: Number of Lanczos vectors ``m`` (the size of ``T``). Smaller than the
            requested ``max_iter`` only after a breakdown (invariant Krylov space).
        num_matvecs: Operator products spent. Equal to ``iterations`` except after a
            breakdown, which is detected every few steps, so that up to
            ``7`` products past the breakdown may have been computed and discarded.
        breakdown: Whether the recurrence stopped early because ``beta`` vanished.
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    basis: torch.Tensor | None
    last_beta: torch.Tensor
    iterations: int
    num_matvecs: int
    breakdown: bool

    def matrix(self) -> torch.Tensor:
        """The dense symmetric tridiagonal ``T`` (float64, ``(m, m)``)."""
        T = torch.diag(self.alphas)
        if self.iterations > 1:
            T = T + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)
        return T


def lanczos_tridiagonal(
    operator: CurvatureOperator,
    v0: torch.Tensor,
    max_iter: int,
    *,
    reorthogonalize: bool = True,
    backend: LinAlgBackend | None = None,
) -> LanczosTridiag:
    r"""Run ``m = min(max_iter, n)`` Lanczos steps from ``v0``; return ``T_m`` (and ``Q_m``).

    The tridiagonal entries are accumulated in float64 whatever the vector dtype. The
    loop does not synchronise with the host at every step: the breakdown test
    ``beta_j <= 100 * eps * (||A q_j|| + beta_{j-1})`` (what is left of the new vector
    after orthogonalisation is at the rounding level of the product) is evaluated every 8
    steps, and the result is truncated at the first breakdown. The test is relative to
    the local scale, not to ``||A||``, so a narrow cluster far below the top eigenvalue is
    not mistaken for an invariant subspace. A division by a vanishing
    ``beta`` never produces NaN (it is clamped), and the discarded extra steps are
    counted in ``num_matvecs``. A breakdown that is missed because rounding keeps
    ``beta`` just above the threshold is harmless with reorthogonalisation: the next
    vector lies in the orthogonal complement of the Krylov space and is coupled to it by
    a ``beta`` at rounding level, so the Ritz values and the Gauss-quadrature weights of
    the original Krylov space are unchanged to working precision.

    Args:
        operator: Symmetric operator ``A``.
        v0: Starting vector, shape ``(n_local,)``, on ``operator.device``, of the
            operator's dtype or a higher precision (the Lanczos vectors use this dtype).
        max_iter: Requested number of Lanczos steps (capped at ``n``).
        reorthogonalize: Full reorthogonalisation (two-pass classical Gram-Schmidt)
            against all previous vectors; keeps the basis, ``O(m n)`` memory. Without it,
            only three vectors are held and ``basis`` is ``None``.
        backend: Vector arithmetic; default ``operator.backend``.

    Returns:
        A :class:`LanczosTridiag`.

    Raises:
        TypeError: ``operator`` is not a :class:`CurvatureOperator` or ``v0`` is not a
            floating tensor.
        ValueError: ``operator`` is not symmetric, ``max_iter < 1``, ``v0`` has the wrong
            shape or device, or ``v0`` is zero.

    Example:
        >>> from hessian_eigenthings import LambdaOperator
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> op = LambdaOperator(lambda v: A @ v, 5, dtype=torch.float64)
        >>> res = lanczos_tridiagonal(op, torch.ones(5, dtype=torch.float64), 5)
        >>> torch.linalg.eigvalsh(res.matrix())
        tensor([1.0000, 2.0000, 3.0000, 4.0000, 5.0000], dtype=torch.float64)
    """
    operator = check_operator(operator, "lanczos_tridiagonal")
    max_iter = check_int(max_iter, "max_iter")
    backend = backend if backend is not None else operator.backend
    n_local = backend.local_size(operator.size)
    if not isinstance(v0, torch.Tensor) or not v0.is_floating_point():
        got = v0.dtype if isinstance(v0, torch.Tensor) else type(v0).__name__
        raise TypeError(f"v0 must be a floating torch.Tensor, got {got}.")
    if v0.shape != (n_local,):
        raise ValueError(
            f"v0 must have shape ({n_local},) (the operator size on this process), got "
            f"{tuple(v0.shape)}."
        )
    if not same_device(v0.device, operator.device):
        raise ValueError(f"v0 must be on the operator's device {operator.device}, got {v0.device}.")
    return tridiagonalize(
        operator.matvec, backend, v0, min(max_iter, operator.size), reorthogonalize
    )


def tridiagonalize(
    product: Callable[[torch.Tensor], torch.Tensor],
    backend: LinAlgBackend,
    v0: torch.Tensor,
    m: int,
    reorthogonalize: bool,
) -> LanczosTridiag:
    """The recurrence of :func:`lanczos_tridiagonal` for ``m`` steps, with ``product(q) = A q``.

    Raises:
        ValueError: ``v0`` is zero.
    """
    dtype, device = v0.dtype, v0.device
    eps = float(torch.finfo(dtype).eps)

    v0_norm = backend.norm(v0)
    if not bool(v0_norm > 0):
        raise ValueError("v0 must be nonzero (its norm is 0); Lanczos needs a direction.")
    q = v0 / v0_norm

    alphas = torch.zeros(m, dtype=torch.float64, device=device)
    # resid[j] = beta_{j+1}: norm of the residual after step j (off-diagonal j, j+1).
    resid = torch.zeros(m, dtype=torch.float64, device=device)
    # scale[j] = ||A q_j|| + beta_{j-1}: the size of what is orthogonalised at step j.
    scale = torch.zeros(m, dtype=torch.float64, device=device)
    basis = torch.empty((m, v0.shape[0]), dtype=dtype, device=device) if reorthogonalize else None
    q_prev: torch.Tensor | None = None
    beta_prev = torch.zeros((), dtype=dtype, device=device)
    tiny = torch.finfo(dtype).tiny

    iterations = m
    steps_done = 0
    breakdown = False
    for j in range(m):
        if basis is not None:
            basis[j] = q
        w = product(q)
        scale[j] = (backend.norm(w) + beta_prev).to(torch.float64)
        alpha = backend.dot(q, w)
        w = w - alpha * q
        if q_prev is not None:
            w = w - beta_prev * q_prev
        if basis is not None:
            prev = basis[: j + 1]
            for _ in range(2):
                w = w - backend.gram(prev.T, w) @ prev
        beta = backend.norm(w)
        alphas[j] = alpha.to(torch.float64)
        resid[j] = beta.to(torch.float64)
        steps_done = j + 1
        q_prev = q
        q = w / torch.clamp(beta, min=tiny)
        beta_prev = beta
        if steps_done % _CHECK_EVERY == 0 or steps_done == m:
            broke = resid[:steps_done] <= _BREAKDOWN_FACTOR * eps * scale[:steps_done]
            hits = torch.nonzero(broke)
            if hits.numel() > 0:
                iterations = int(hits[0, 0]) + 1
                breakdown = True
                break

    return LanczosTridiag(
        alphas=alphas[:iterations],
        betas=resid[: iterations - 1],
        basis=None if basis is None else basis[:iterations],
        last_beta=resid[iterations - 1],
        iterations=iterations,
        num_matvecs=steps_done,
        breakdown=breakdown,
    )

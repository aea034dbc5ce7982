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

:class:`LockstepLanczos` runs several such recurrences (from the columns of a block of
start vectors) side by side: each step multiplies the current vectors of all runs in
one block product, and every run does exactly the arithmetic it would do alone, so a
run in lockstep and the same run alone give the same tridiagonal matrix (bit for bit
when the block product returns the same columns as one-vector products).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hessian_eigenthings.algorithms._validation import check_int, check_operator
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.backends.devices import same_device
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["LanczosTridiag", "LockstepLanczos", "lanczos_tridiagonal", "tridiagonalize"]

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
    run = LockstepLanczos(backend, v0.unsqueeze(1), m, reorthogonalize)
    while not run.done():
        run.step(lambda Q: product(Q[:, 0]).unsqueeze(1))
    return run.result(0)


class LockstepLanczos:
    """``R`` Lanczos recurrences of at most ``m`` steps, advanced together.

    Each :meth:`step` multiplies the current Lanczos vectors of the runs still going as
    one block ``(n_local, a)`` (``a`` active runs) and then does, run by run, the
    arithmetic of :func:`lanczos_tridiagonal` (the same operations in the same order,
    none shared between runs). Every 8 steps one host synchronisation tests all active
    runs for breakdown; a run that broke down leaves the block.

    Memory: the ``R`` bases, ``R * m * n_local`` entries of the vector dtype (with
    ``reorthogonalize``; otherwise ``2 R`` vectors).

    Args:
        backend: Vector arithmetic.
        starts: Start vectors as columns ``(n_local, R)``, of the vector dtype.
        m: Steps per run.
        reorthogonalize: Full reorthogonalisation (keeps the bases).

    Raises:
        ValueError: A start vector is zero.
    """

    def __init__(
        self, backend: LinAlgBackend, starts: torch.Tensor, m: int, reorthogonalize: bool
    ) -> None:
        self.backend, self.m = backend, m
        count, n_local = starts.shape[1], starts.shape[0]
        dtype, device = starts.dtype, starts.device
        self.eps = float(torch.finfo(dtype).eps)
        self.tiny = torch.finfo(dtype).tiny
        self.q = torch.empty((count, n_local), dtype=dtype, device=device)
        for r in range(count):
            norm = backend.norm(starts[:, r])
            if not bool(norm > 0):
                raise ValueError("v0 must be nonzero (its norm is 0); Lanczos needs a direction.")
            self.q[r] = starts[:, r] / norm
        self.q_prev = torch.zeros_like(self.q)
        self.beta_prev = torch.zeros(count, dtype=dtype, device=device)
        self.alphas = torch.zeros((count, m), dtype=torch.float64, device=device)
        # resid[r, j] = beta_{j+1} of run r (off-diagonal j, j+1); scale[r, j] =
        # ||A q_j|| + beta_{j-1}, the size of what is orthogonalised at step j.
        self.resid = torch.zeros((count, m), dtype=torch.float64, device=device)
        self.scale = torch.zeros((count, m), dtype=torch.float64, device=device)
        self.basis = (
            torch.empty((count, m, n_local), dtype=dtype, device=device)
            if reorthogonalize
            else None
        )
        self.steps = 0  # lockstep steps made
        self.iterations = [m] * count  # the size of each run's T (smaller after breakdown)
        self.spent = [0] * count  # products per run
        self.broke = [False] * count
        self.active = list(range(count))

    @property
    def count(self) -> int:
        """Number of runs ``R``."""
        return len(self.iterations)

    def done(self) -> bool:
        """Whether every run has made its ``m`` steps or broken down."""
        return not self.active

    def step(self, product: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One Lanczos step of every active run; ``product(Q) = A Q`` for columns ``Q``."""
        j, active, backend = self.steps, self.active, self.backend
        if self.basis is not None:
            self.basis[active, j] = self.q[active]
        W = product(self.q[active].T)
        for col, r in enumerate(active):
            w, q, beta_prev = W[:, col], self.q[r], self.beta_prev[r]
            self.scale[r, j] = (backend.norm(w) + beta_prev).to(torch.float64)
            alpha = backend.dot(q, w)
            w = w - alpha * q
            if j > 0:
                w = w - beta_prev * self.q_prev[r]
            if self.basis is not None:
                prev = self.basis[r, : j + 1]
                for _ in range(2):
                    w = w - backend.gram(prev.T, w) @ prev
            beta = backend.norm(w)
            self.alphas[r, j] = alpha.to(torch.float64)
            self.resid[r, j] = beta.to(torch.float64)
            self.q_prev[r] = q
            self.q[r] = w / torch.clamp(beta, min=self.tiny)
            self.beta_prev[r] = beta
            self.spent[r] = j + 1
        self.steps = j + 1
        if self.steps % _CHECK_EVERY == 0 or self.steps == self.m:
            self._check_breakdown()

    def _check_breakdown(self) -> None:
        """Stop the runs whose residual vanished (one host sync for all of them)."""
        done = self.steps
        rows = self.active
        broke = (
            self.resid[rows, :done] <= _BREAKDOWN_FACTOR * self.eps * self.scale[rows, :done]
        ).cpu()
        still = []
        for i, r in enumerate(rows):
            hits = torch.nonzero(broke[i])
            if hits.numel() > 0:
                self.iterations[r] = int(hits[0, 0]) + 1
                self.broke[r] = True
            elif done < self.m:
                still.append(r)
        self.active = still

    def result(self, r: int, *, steps: int | None = None) -> LanczosTridiag:
        """Run ``r`` as a :class:`LanczosTridiag`, cut at ``steps`` (default: all it made)."""
        it = min(self.iterations[r], self.spent[r] if steps is None else steps)
        return LanczosTridiag(
            alphas=self.alphas[r, :it],
            betas=self.resid[r, : max(it - 1, 0)],
            basis=None if self.basis is None else self.basis[r, :it],
            last_beta=self.resid[r, max(it - 1, 0)],
            iterations=it,
            num_matvecs=self.spent[r],
            breakdown=self.broke[r],
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`step` reads later (CPU tensors and plain values)."""
        return {
            "q": self.q.cpu(),
            "q_prev": self.q_prev.cpu(),
            "beta_prev": self.beta_prev.cpu(),
            "alphas": self.alphas.cpu(),
            "resid": self.resid.cpu(),
            "scale": self.scale.cpu(),
            "basis": None if self.basis is None else self.basis[:, : self.steps].cpu(),
            "steps": self.steps,
            "iterations": list(self.iterations),
            "spent": list(self.spent),
            "broke": list(self.broke),
            "active": list(self.active),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (onto this run's device)."""
        device = self.q.device
        for name in ("q", "q_prev", "beta_prev", "alphas", "resid", "scale"):
            setattr(self, name, state[name].to(device))
        self.steps = int(state["steps"])
        if self.basis is not None:
            self.basis[:, : self.steps] = state["basis"].to(device)
        self.iterations = [int(i) for i in state["iterations"]]
        self.spent = [int(i) for i in state["spent"]]
        self.broke = [bool(b) for b in state["broke"]]
        self.active = [int(r) for r in state["active"]]

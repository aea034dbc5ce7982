r"""Probes and sketches shared by the stochastic estimators (trace and diagonal).

Conventions: probes, sketches and products are column blocks ``(n, s)`` (as in the
papers and as :meth:`~hessian_eigenthings.operators.CurvatureOperator.matmat`); the
operator is applied to at most ``block_size`` columns at a time.

:class:`SweepRun` is the shape every estimator has: a sequence of *phases*, each a sweep
over a number of columns (stored ones such as a sketch ``Omega`` or a basis ``Q``, or
fresh probes), multiplied by the operator ``block_size`` columns at a time; between
phases the estimator computes without products (a QR, a rank test). The state between
two blocks is complete, which is where the driver checks the time limit and writes
checkpoints.

The sketching estimators (XTrace, XDiag) share the rank test of their sketch and its
fallback: when ``Y = A Omega = Q R`` is numerically rank deficient, the leave-one-out
projectors are ill-defined, and the budget goes to the deflated estimator instead: the
exact part on ``Q_r``, the leading ``r' = min(r, s - 2)`` directions of ``range(Y)``
(:func:`deflation_basis`, ``r'`` products), plus Hutchinson on fresh probes for the rest
(``s - r'`` products).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, TypeVar

import numpy as np
import torch

from hessian_eigenthings.algorithms._calls import ProbeCall
from hessian_eigenthings.algorithms._precision import default_vector_dtype, eps
from hessian_eigenthings.algorithms._records import StopReason
from hessian_eigenthings.algorithms._run import ResumableRun
from hessian_eigenthings.algorithms.estimator_results import TraceResult
from hessian_eigenthings.backends.base import LinAlgBackend

__all__ = [
    "ProbeSweep",
    "SweepRun",
    "TraceRun",
    "deflation_basis",
    "loo_directions",
    "numerical_rank",
    "paired_dots",
]

R = TypeVar("R")


def paired_dots(backend: LinAlgBackend, n: int, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``(x_j^T y_j)_j`` for the columns of two ``(n_local, b)`` blocks (global size n), float64.

    Whole vectors are reduced locally; a sharded backend goes through ``gram`` (whose
    reduction spans the shards) and keeps the diagonal.
    """
    if backend.local_size(n) == n:
        return torch.einsum("ij,ij->j", X, Y).to(torch.float64)
    return torch.diagonal(backend.gram(X, Y)).to(torch.float64)


def loo_directions(R: torch.Tensor) -> torch.Tensor:
    r"""Columns ``s_i = R^{-T} e_i / ||R^{-T} e_i||`` for an invertible upper-triangular ``R``.

    If ``Y = Q R`` with ``Q`` orthonormal, ``Q s_i`` is the unit vector of ``range(Y)``
    orthogonal to every column of ``Y`` except the ``i``-th, so the projector onto the span
    of ``Y`` without column ``i`` is ``Q (I - s_i s_i^T) Q^T`` (Epperly, Tropp & Webber
    2024, Sec. 2). Computed in float64.
    """
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    S = torch.linalg.solve_triangular(R.T, eye, upper=False)
    return S / torch.linalg.vector_norm(S, dim=0, keepdim=True)


def numerical_rank(R64: torch.Tensor, dtype: torch.dtype) -> int:
    """Singular values of ``R`` above ``s * eps(dtype) * sigma_max`` (the sketch's rank)."""
    svals = torch.linalg.svdvals(R64)
    tol = R64.shape[0] * eps(dtype) * float(svals[0])
    return int((svals > tol).sum())


def deflation_basis(Q: torch.Tensor, R64: torch.Tensor, rank: int) -> torch.Tensor:
    """``Q_r = Q U_{:, :r'}``: the ``r' = min(rank, s - 2)`` leading directions of ``Q R``.

    ``U`` are the left singular vectors of ``R``, so ``Q U`` are those of the sketch; two
    directions are always left to the fresh probes, whose spread gives the error bar.
    """
    keep = min(rank, R64.shape[0] - 2)
    U, _, _ = torch.linalg.svd(R64)
    return Q @ U[:, :keep].to(Q.dtype)


class SweepRun(ResumableRun[R]):
    """An estimator run: phases of column sweeps, ``block_size`` columns per product.

    ``self.phase`` names the current phase and ``self.col`` counts its columns done. A
    subclass says how many columns the phase has (:meth:`_size`), which columns to
    multiply (:meth:`_columns`), what to do with their products (:meth:`_take`) and how
    to leave a finished phase (:meth:`_advance`, which may compute, draw probes, or set
    the final result). A phase of zero columns (``"draw"``, the initial one) is left at
    once, so probes are drawn only when a run starts, never before a resume.

    Args:
        call: The checked arguments.
    """

    #: Whether :meth:`apply` checks each block's products for inf/nan (else ``_take``
    #: checks what it derives from them).
    check_products = True
    #: The estimator's name in results (``method``).
    method = ""

    def __init__(self, call: ProbeCall) -> None:
        super().__init__(call.operator, call.backend, call.seed)
        self.distribution = call.distribution
        self.block_size = call.block_size
        self.store = call.store
        self.dtype = default_vector_dtype(call.operator.dtype)
        self.phase = "draw"
        self.col = 0

    def about(self) -> dict[str, Any]:
        """The fields every estimator result records about its run."""
        return {
            "operator_size": self.op.size,
            "method": self.method,
            "distribution": self.distribution,
            "seed": self.seed,
        }

    def draw(self, num: int) -> torch.Tensor:
        """``num`` fresh probes (drawn on the operator's device), on the sketch device."""
        probes = self.backend.probes(
            self.op.size,
            num,
            generator=self.gen,
            dtype=self.dtype,
            device=self.op.device,
            distribution=self.distribution,
        )
        return probes.to(self.store)

    def step(self) -> None:
        self._settle()
        b = min(self.block_size, self._size() - self.col)
        X = self._columns(self.col, b)
        self._take(self.col, X, self.apply(X, check=self.check_products))
        self.col += b
        self._settle()

    def _settle(self) -> None:
        while not self.done() and self.col >= self._size():
            self._advance()

    def _enter(self, phase: str) -> None:
        self.phase, self.col = phase, 0

    @abstractmethod
    def _size(self) -> int:
        """Columns of the current phase."""

    @abstractmethod
    def _columns(self, col: int, b: int) -> torch.Tensor:
        """The ``b`` columns from ``col`` on to multiply (stored, or fresh probes)."""

    @abstractmethod
    def _take(self, col: int, X: torch.Tensor, AX: torch.Tensor) -> None:
        """Use the products ``A X`` of the columns from ``col`` on."""

    @abstractmethod
    def _advance(self) -> None:
        """Leave the finished current phase (compute, then :meth:`_enter` the next)."""


class ProbeSweep(SweepRun[R]):
    """One sweep of ``num_matvecs`` fresh probes (Hutchinson's estimators)."""

    def __init__(self, call: ProbeCall) -> None:
        super().__init__(call)
        self.m = call.num_matvecs

    def used(self) -> int:
        return self.col

    def done(self) -> bool:
        return self.col >= self.m

    def _size(self) -> int:
        return self.m

    def _advance(self) -> None:
        self._enter("probes")

    def _columns(self, col: int, b: int) -> torch.Tensor:
        return self.draw(b)


class TraceRun(SweepRun[TraceResult]):
    """A trace estimator's run: results are :class:`TraceResult` named ``algorithm``."""

    def _trace(
        self,
        samples: np.ndarray,
        stop_reason: StopReason,
        *,
        num_matvecs: int,
        details: dict[str, Any],
        offset: float | None = None,
    ) -> TraceResult:
        """The mean of ``samples`` (plus ``offset``) with its standard error."""
        return TraceResult.from_samples(
            samples,
            offset=offset,
            num_matvecs=num_matvecs,
            details=details,
            stop_reason=stop_reason,
            **self.about(),
        )

    def _on_sketch(
        self, forms: torch.Tensor, stop_reason: StopReason, **details: Any
    ) -> TraceResult | None:
        """Partial result inside a sketch: Hutchinson on its probes' forms (at least 2)."""
        done = forms.shape[0]
        if done < 2:
            return None
        return self._trace(
            forms.cpu().numpy(),
            stop_reason,
            num_matvecs=self.used(),
            details={
                "partial_estimator": "hutchinson_on_sketch",
                "num_probes": done,
                "dof": done - 1,
                **details,
            },
        )

"""Result of an eigensolver: eigenpairs with their honest convergence status.

Every eigensolver in :mod:`hessian_eigenthings.algorithms` returns an :class:`EigenResult`
(stochastic power iteration returns the subclass :class:`StochasticEigenResult`, which
adds the spread of its estimate). A result never hides a failure: each pair carries its
residual norm and a ``converged`` flag, and the number of matrix-vector products spent is
recorded, so a run that hit its budget is visible as such.

Example:
    >>> eigenvalues, eigenvectors = result          # tuple unpacking
    >>> result.converged.all()                      # every pair met the tolerance
    >>> EigenResult.from_dict(json.loads(json.dumps(result.to_dict())))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from hessian_eigenthings.algorithms._display import fmt_list, html_table
from hessian_eigenthings.algorithms._records import ResultRecord, StopReason

__all__ = ["EigenResult", "StochasticEigenResult", "StopReason"]


@dataclass
class EigenResult(ResultRecord):
    """Eigenpairs ``A v_i = lambda_i v_i`` of a symmetric operator, with their status.

    Attributes:
        eigenvalues: ``(k,)`` float64 tensor on the CPU, ordered by ``which`` (``"LM"``:
            decreasing magnitude, ``"LA"``: decreasing, ``"SA"``: increasing).
        eigenvectors: ``(k, n)`` tensor whose *rows* are unit eigenvectors, on the
            operator's device, in the solver's vector dtype.
        residuals: ``(k,)`` float64 tensor, ``||A v_i - lambda_i v_i||_2`` (absolute,
            unit ``v_i``) or, where the solver says so, a proven upper bound of it.
        converged: ``(k,)`` bool tensor; ``converged[i]`` iff ``residuals[i]`` meets the
            solver's tolerance (see the solver's docstring for the exact criterion).
        iterations: Outer iterations (restarts for Lanczos, steps for power iteration).
        num_matvecs: Matrix-vector products with the operator that were spent.
        which: Which end of the spectrum was requested (``"LM"``, ``"LA"``, ``"SA"``).
        tol: Relative-residual tolerance the flags refer to.
        seed: Seed of the random start vector(s); reruns with it reproduce the result.
        method: Name of the solver that produced the result.
        stop_reason: Why the run stopped (:data:`StopReason`): ``"converged"``,
            ``"max_iter"`` (matvec budget spent), ``"exhausted"`` (the basis spans the
            whole space), ``"stagnated"`` (Lanczos: the residuals stopped decreasing above
            a ``tol`` the operator's precision does not reach), ``"time_limit"``
            (``time_limit=`` passed; partial result), ``"non_finite"`` (the partial
            result carried by a
            :class:`~hessian_eigenthings.errors.NonFiniteError`), or ``""`` when the
            solver does not record it.
    """

    _default_dtypes: ClassVar[dict[str, torch.dtype]] = {"converged": torch.bool}

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    iterations: int
    num_matvecs: int
    which: str = "LM"
    tol: float | None = None
    seed: int | None = None
    method: str = ""
    stop_reason: StopReason = ""

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Unpack as ``eigenvalues, eigenvectors = result``."""
        yield self.eigenvalues
        yield self.eigenvectors

    @property
    def k(self) -> int:
        """Number of eigenpairs."""
        return int(self.eigenvalues.shape[0])

    @property
    def all_converged(self) -> bool:
        """Whether every returned pair met the tolerance."""
        return bool(self.converged.all())

    def to_dict(self, *, include_eigenvectors: bool = True) -> dict[str, Any]:
        """A JSON-serialisable dict (plain lists, floats, ints, strings).

        Args:
            include_eigenvectors: Store the ``(k, n)`` eigenvectors (large for big
                models). Without them, :meth:`from_dict` restores an empty ``(k, 0)``
                block.
        """
        out = super().to_dict()
        if not include_eigenvectors:
            out["eigenvectors"] = None
        return out

    @classmethod
    def _decode_field(cls, name: str, hint: Any, data: dict[str, Any]) -> Any:
        if name == "eigenvectors":
            k = len(data["eigenvalues"])
            if data["eigenvectors"] is None:
                dtype = getattr(torch, data.get("eigenvectors_dtype", "float64"))
                return torch.empty((k, 0), dtype=dtype)
            vectors = super()._decode_field(name, hint, data)
            return vectors.reshape(k, -1) if k > 0 else vectors
        if name == "stop_reason" and data[name] == "completed":
            # Written before 2.0 by stochastic power iteration: now "converged"/"max_iter".
            return "converged" if all(data["converged"]) else "max_iter"
        return super()._decode_field(name, hint, data)

    # -- display (consoles and notebooks) --------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(k={self.k}, method={self.method!r}, which={self.which!r}, "
            f"stop_reason={self.stop_reason!r}, num_matvecs={self.num_matvecs}, "
            f"eigenvalues={fmt_list(self.eigenvalues.tolist())}, "
            f"residuals={fmt_list(self.residuals.tolist(), spec='.2e')}, "
            f"converged={self.converged.tolist()[:6]}{'...' if self.k > 6 else ''})"
        )

    def _repr_html_(self) -> str:
        values = self.eigenvalues.tolist()
        residuals = self.residuals.tolist()
        rows = [
            [str(i), f"{lam:.8g}", f"{res:.2e}", f"{res / abs(lam):.2e}" if lam else "inf", str(c)]
            for i, (lam, res, c) in enumerate(zip(values, residuals, self.converged.tolist()))
        ]
        summary = [
            ("method", self.method or "?"),
            ("which", self.which),
            ("tol", "default" if self.tol is None else f"{self.tol:.1e}"),
            ("converged", f"{int(self.converged.sum())} of {self.k}"),
            ("stop reason", self.stop_reason or "?"),
            ("matvecs", str(self.num_matvecs)),
            ("n", str(int(self.eigenvectors.shape[-1])))
            if self.eigenvectors.numel()
            else ("eigenvectors", "not stored"),
            ("seed", str(self.seed)),
        ]
        header = ["i", "eigenvalue", "residual ||Av - lv||", "relative", "converged"]
        return html_table(type(self).__name__, summary, header, rows)


@dataclass
class StochasticEigenResult(EigenResult):
    """An :class:`EigenResult` whose eigenvalues are averages of noisy estimates.

    ``eigenvalues[i]`` is the mean of ``num_samples`` Rayleigh-quotient samples taken
    over the last iterations; the extra fields give their spread.

    Attributes:
        eigenvalue_std: ``(k,)`` sample standard deviation of the estimates.
        eigenvalue_stderr: ``(k,)`` standard error of the mean, ``std / sqrt(num_samples)``
            (treats the samples as independent; consecutive iterates are correlated
            through the vector, so read it as an indication, not a confidence interval).
        num_samples: Number of estimates averaged per eigenvalue.
        momentum: Momentum coefficient ``beta`` that was used.
    """

    eigenvalue_std: torch.Tensor | None = None
    eigenvalue_stderr: torch.Tensor | None = None
    num_samples: int = 0
    momentum: float = 0.0

    def __repr__(self) -> str:  # the dataclass would generate one with every tensor in full
        std = "" if self.eigenvalue_stderr is None else fmt_list(self.eigenvalue_stderr.tolist())
        return (
            f"{super().__repr__()[:-1]}, eigenvalue_stderr={std}, num_samples={self.num_samples})"
        )

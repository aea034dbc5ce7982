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

Long runs: ``checkpoint=`` saves the state between blocks of products (Hutchinson: the
running mean and sum of squared deviations; XDiag: the probes and the sketch, also inside
the rank-deficient fallback), and a call with the same arguments resumes bit for bit;
``time_limit=`` returns the estimate of the products made (Hutchinson: of its probes so
far; XDiag: the Hutchinson diagonal of the sketch probes made,
``details["partial_estimator"] = "hutchinson_on_sketch"``); a non-finite product raises
:class:`~hessian_eigenthings.errors.NonFiniteError` with that partial estimate.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, cast

import torch
from typing_extensions import Unpack

from hessian_eigenthings.algorithms._calls import ProbeCall
from hessian_eigenthings.algorithms._records import StopReason
from hessian_eigenthings.algorithms._run import LongRunOptions, drive
from hessian_eigenthings.algorithms._sketch import (
    ProbeSweep,
    SweepRun,
    deflation_basis,
    loo_directions,
    numerical_rank,
)
from hessian_eigenthings.algorithms._validation import check_choice
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
    **long_run: Unpack[LongRunOptions],
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
        **long_run: ``checkpoint``, ``checkpoint_every``, ``checkpoint_seconds``,
            ``time_limit`` (see :class:`~hessian_eigenthings.algorithms.LongRunOptions`).
            The checkpoint is written between blocks; a time-limited call (with at least
            2 probes) returns the estimate of the products made.

    Returns:
        A :class:`DiagonalResult` with float64 ``estimate`` and ``stderr`` of shape
        ``(n_local,)`` on the sketch device (the operator's device by default).

    Raises:
        ValueError: Unknown ``method`` or ``distribution``, or ``num_matvecs`` below the
            method's minimum.
        NonFiniteError: A product was inf/nan; ``err.partial`` is the estimate of the
            products before it (``None`` with fewer than 2 probes).
    """
    method = check_choice(method, DIAGONAL_METHODS, "diagonal method")
    xdiag = method == "xdiag"
    probes = (distribution, seed, block_size, backend)
    sketch = sketch_device if xdiag else None  # Hutchinson holds no sketch
    call = ProbeCall.check(
        "diagonal",
        method,
        _MIN_MATVECS[method],
        operator,
        num_matvecs,
        probes,
        long_run,
        sketch_device=sketch,
        whole_vectors=xdiag,
    )
    if xdiag and min(call.num_matvecs // 2, call.operator.size) < 2:
        raise ValueError(f"xdiag needs an operator of size >= 2, got size {call.operator.size}.")
    run = _XDiag(call) if xdiag else _HutchinsonDiagonal(call)
    sketch_device_ = call.store if xdiag else None
    return drive(run, call.config(run.dtype, sketch_device=sketch_device_), call.long_run)


def _mean_stderr_per_entry(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean of a ``(n, b)`` float64 block and its standard error ``std / sqrt(b)``."""
    return X.mean(dim=1), X.std(dim=1, correction=1) / math.sqrt(X.shape[1])


class _DiagonalRun(SweepRun[DiagonalResult]):
    """A diagonal estimator's run; its state is ``tensors`` plus the sweep position."""

    def __init__(self, call: ProbeCall) -> None:
        super().__init__(call)
        self.m = call.num_matvecs
        self.tensors: dict[str, torch.Tensor] = {}

    def make(
        self,
        est: torch.Tensor,
        se: torch.Tensor,
        used: int,
        details: dict[str, Any],
        stop: StopReason,
    ) -> DiagonalResult:
        return DiagonalResult(
            estimate=est,
            stderr=se,
            num_matvecs=used,
            details=details,
            stop_reason=stop,
            **self.about(),
        )

    @abstractmethod
    def counters(self) -> dict[str, Any]:
        """The run's position (saved with the tensors)."""

    @abstractmethod
    def load_counters(self, counters: dict[str, Any]) -> None:
        """Restore what :meth:`counters` returned."""

    def state_dict(self) -> dict[str, Any]:
        tensors = {key: t.cpu() for key, t in self.tensors.items()}
        return {"tensors": tensors, "counters": self.counters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensors = {key: t.to(self.store) for key, t in state["tensors"].items()}
        self.load_counters(dict(state["counters"]))


class _HutchinsonDiagonal(ProbeSweep[DiagonalResult], _DiagonalRun):
    """Mean and standard error of ``omega_k * A omega_k`` (blockwise Chan et al. merge)."""

    algorithm = "diagonal-hutchinson"
    method = "hutchinson"

    def __init__(self, call: ProbeCall) -> None:
        super().__init__(call)
        n_local = self.backend.local_size(self.op.size)
        mean = torch.zeros(n_local, dtype=torch.float64, device=self.store)
        self.tensors = {"mean": mean, "m2": torch.zeros_like(mean)}

    def counters(self) -> dict[str, Any]:
        return {"count": self.col}

    def load_counters(self, counters: dict[str, Any]) -> None:
        self.phase, self.col = "probes", int(counters["count"])

    def _take(self, col: int, X: torch.Tensor, AX: torch.Tensor) -> None:
        b = X.shape[1]
        P = (X * AX).to(torch.float64)
        block_mean = P.mean(dim=1)
        block_m2 = ((P - block_mean[:, None]) ** 2).sum(dim=1)
        mean, m2 = self.tensors["mean"], self.tensors["m2"]
        delta = block_mean - mean
        total = col + b
        self.tensors["mean"] = mean + delta * (b / total)
        self.tensors["m2"] = m2 + block_m2 + delta * delta * (col * b / total)

    def _estimate(self, stop: StopReason) -> DiagonalResult:
        count = self.col
        stderr = torch.sqrt(self.tensors["m2"] / (count - 1)) / math.sqrt(count)
        return self.make(self.tensors["mean"], stderr, count, {"num_probes": count}, stop)

    def partial(self, stop_reason: StopReason) -> DiagonalResult | None:
        return self._estimate(stop_reason) if self.col >= 2 else None

    def result(self) -> DiagonalResult:
        return self._estimate("completed")


class _XDiag(_DiagonalRun):
    """XDiag with ``s = min(m // 2, n)`` probes; see the module docstring.

    Phases: ``"draw"``, ``"sketch"`` (``Y = A Omega``), then QR and the rank test, then
    ``"z"`` (``Z = A Q``); a rank-deficient sketch goes to the shared fallback instead:
    ``"deflate"`` (``A Q_r``) and ``"fresh"`` (fresh probes).
    """

    algorithm = "diagonal-xdiag"
    method = "xdiag"

    def __init__(self, call: ProbeCall) -> None:
        super().__init__(call)
        self.s = min(self.m // 2, self.op.size)
        self.rank = 0
        self.final: DiagonalResult | None = None

    def counters(self) -> dict[str, Any]:
        return {"phase": self.phase, "col": self.col, "rank": self.rank}

    def load_counters(self, counters: dict[str, Any]) -> None:
        self.phase, self.col = str(counters["phase"]), int(counters["col"])
        self.rank = int(counters.get("rank", 0))

    def _keep(self) -> int:
        return self.tensors["Qr"].shape[1] if "Qr" in self.tensors else 0

    def used(self) -> int:
        offset = {"draw": 0, "sketch": 0, "fresh": self.s + self._keep()}
        return offset.get(self.phase, self.s) + self.col

    def done(self) -> bool:
        return self.final is not None

    def _size(self) -> int:
        sizes = {"draw": 0, "deflate": self._keep(), "fresh": self.s - self._keep()}
        return sizes.get(self.phase, self.s)

    def _advance(self) -> None:
        t = self.tensors
        if self.phase == "draw":
            omega = self.draw(self.s)
            self.tensors = {"omega": omega, "Y": torch.empty_like(omega)}
            self._enter("sketch")
        elif self.phase == "sketch":
            self._after_sketch()
        elif self.phase == "z":
            self.final = self._finish()
        elif self.phase == "deflate":
            t["low"] = (t["Qr"] * t.pop("Zr")).sum(dim=1).to(torch.float64)
            fresh = self.s - self._keep()
            t["X"] = torch.empty((self.op.size, fresh), dtype=torch.float64, device=self.store)
            self._enter("fresh")
        else:
            mean, stderr = _mean_stderr_per_entry(t["X"])
            estimate = t["low"] + mean
            if not bool(torch.isfinite(estimate).all() and torch.isfinite(stderr).all()):
                self.fail(
                    self.s + 1, hint=" or a later one (the fallback's estimate is not finite)"
                )
            details = {"sketch_size": self.s, "sketch_rank": self.rank}
            self.final = self.make(estimate, stderr, self.used(), details, "completed")

    def _after_sketch(self) -> None:
        t, s = self.tensors, self.s
        sk_mean, sk_se = self._sketch_hutchinson(s)
        Q, R = torch.linalg.qr(t["Y"])
        R64 = R.to(torch.float64)
        self.rank = numerical_rank(R64, self.dtype)
        if self.rank < s:
            Qr = deflation_basis(Q, R64, self.rank)
            self.tensors = {
                "Qr": Qr,
                "Zr": torch.empty_like(Qr),
                "sk_mean": sk_mean,
                "sk_se": sk_se,
            }
            self._enter("deflate")
            return
        self.tensors = {
            "omega": t["omega"],
            "Q": Q,
            "R64": R64,
            "Z": torch.empty_like(Q),
            "sk_mean": sk_mean,
            "sk_se": sk_se,
        }
        self._enter("z")

    def _columns(self, col: int, b: int) -> torch.Tensor:
        t = self.tensors
        if self.phase == "fresh":
            return self.draw(b)
        source = {"sketch": "omega", "z": "Q", "deflate": "Qr"}[self.phase]
        return t[source][:, col : col + b]

    def _take(self, col: int, X: torch.Tensor, AX: torch.Tensor) -> None:
        t, b = self.tensors, X.shape[1]
        if self.phase == "fresh":
            Qr = t["Qr"]
            t["X"][:, col : col + b] = (X * (AX - Qr @ (Qr.T @ AX))).to(torch.float64)
        else:
            target = {"sketch": "Y", "z": "Z", "deflate": "Zr"}[self.phase]
            t[target][:, col : col + b] = AX

    def _sketch_hutchinson(self, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tensors
        return _mean_stderr_per_entry((t["omega"][:, :cols] * t["Y"][:, :cols]).to(torch.float64))

    def _finish(self) -> DiagonalResult:
        t, s = self.tensors, self.s
        omega, Q, Z, R64 = t["omega"], t["Q"], t["Z"], t["R64"]
        S = loo_directions(R64).to(Q.dtype)
        QS = Q @ S
        ZS = Z @ S
        dQZ = (Q * Z).sum(dim=1)
        coef = (S.to(torch.float64) * R64).sum(0).to(Q.dtype)  # s_i^T R e_i
        # Y e_i - Q R e_i vanishes (Y = Q R): only the left-out direction Q s_i remains.
        D = (omega * (QS * coef) + dQZ[:, None] - QS * ZS).to(torch.float64)
        estimate, stderr = _mean_stderr_per_entry(D)
        details = {"sketch_size": s, "sketch_rank": self.rank}
        return self.make(estimate, stderr, 2 * s, details, "completed")

    def partial(self, stop_reason: StopReason) -> DiagonalResult | None:
        if self.phase in ("draw", "sketch"):
            cols = self.col
            if cols < 2:
                return None
            mean, se = self._sketch_hutchinson(cols)
        else:
            cols = self.s
            mean, se = self.tensors["sk_mean"], self.tensors["sk_se"]
        details = {"partial_estimator": "hutchinson_on_sketch", "num_probes": cols}
        return self.make(mean, se, self.used(), details, stop_reason)

    def result(self) -> DiagonalResult:
        return cast(DiagonalResult, self.final)  # set when done() became True

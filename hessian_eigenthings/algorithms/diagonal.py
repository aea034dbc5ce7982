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
running mean and sum of squared deviations; XDiag: the probes and the sketch), and a call
with the same arguments resumes bit for bit; ``time_limit=`` returns the estimate of the
products made (Hutchinson: of its probes so far; XDiag: the Hutchinson diagonal of the
sketch probes made, ``details["partial_estimator"] = "hutchinson_on_sketch"``); a
non-finite product raises :class:`~hessian_eigenthings.errors.NonFiniteError`
with that partial estimate. The rank-deficient XDiag fallback runs without intermediate
writes or time checks.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from typing import Any, cast

import torch

from hessian_eigenthings.algorithms._deadline import Deadline
from hessian_eigenthings.algorithms._estimator_utils import (
    agree_seed,
    apply_columns,
    check_block_size,
    check_distribution,
    check_num_matvecs,
    check_operator,
    check_single_device,
    check_sketch_options,
    draw_columns,
    first_non_finite,
    loo_directions,
    non_finite_error,
    resolve_seed,
    working_dtype,
)
from hessian_eigenthings.algorithms.checkpoint import (
    Checkpointer,
    generator_state,
    restore_generator,
)
from hessian_eigenthings.algorithms.estimator_results import DiagonalResult
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.errors import NonFiniteError
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
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    time_limit: float | None = None,
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
        checkpoint: Path of a checkpoint file, written between blocks; a call with the
            same arguments resumes from it, bit for bit. Deleted when done, kept when
            ``time_limit`` stops the call.
        checkpoint_every: Write every this many products (rounded up to whole blocks).
        checkpoint_seconds: Write when this many seconds passed since the last write.
        time_limit: Wall-clock seconds, checked between blocks; once passed (with at
            least 2 probes), the estimate of the products made is returned with
            ``stop_reason="time_limit"``.

    Returns:
        A :class:`DiagonalResult` with float64 ``estimate`` and ``stderr`` of shape
        ``(n_local,)`` on the sketch device (the operator's device by default).

    Raises:
        ValueError: Unknown ``method`` or ``distribution``, or ``num_matvecs`` below the
            method's minimum.
        NonFiniteError: A product was inf/nan; ``err.partial`` is the estimate of the
            products before it (``None`` with fewer than 2 probes).
    """
    if method not in DIAGONAL_METHODS:
        raise ValueError(f"Unknown diagonal method {method!r}; expected one of {DIAGONAL_METHODS}.")
    operator = check_operator(operator, "diagonal")
    m = check_num_matvecs(num_matvecs, _MIN_MATVECS[method], method)
    distribution = check_distribution(distribution)
    block_size = check_block_size(block_size)
    _, store = check_sketch_options(None, sketch_device, operator)
    backend = backend if backend is not None else operator.backend
    if method == "xdiag":
        check_single_device(backend, operator, "diagonal(method='xdiag')")
        if min(m // 2, operator.size) < 2:
            raise ValueError(f"xdiag needs an operator of size >= 2, got size {operator.size}.")
    seed_ = agree_seed(resolve_seed(seed), backend, operator.device)
    checkpointer = Checkpointer.create(
        checkpoint,
        checkpoint_every,
        checkpoint_seconds,
        algorithm=f"diagonal-{method}",
        operator=operator,
        backend=backend,
        config={
            "num_matvecs": m,
            "distribution": distribution,
            "block_size": block_size,
            "sketch_device": store if method == "xdiag" else None,
            "seed": seed,
            "dtype": working_dtype(operator),
        },
    )
    run = _HutchinsonDiagonal if method == "hutchinson" else _XDiag
    runner = run(operator, backend, m, seed_, distribution, store, block_size)
    if checkpointer is not None:
        saved = checkpointer.load()
        if saved is not None:
            runner.load(saved)
    deadline = Deadline(time_limit)
    start = runner.used()
    while not runner.done():
        if runner.used() > start and deadline.expired(operator.device):
            cut = runner.partial("time_limit")
            if cut is not None:
                if checkpointer is not None:
                    checkpointer.save(runner.used(), runner.state())
                return cut
        if checkpointer is not None:
            checkpointer.maybe_save(runner.used(), runner.state)
        runner.step()
    out = runner.result()
    if checkpointer is not None:
        checkpointer.finish()
    return out


class _Run(ABC):
    """A resumable estimator run: ``step()`` makes one block of products."""

    method = ""

    def __init__(
        self,
        operator: CurvatureOperator,
        backend: LinAlgBackend,
        m: int,
        seed: int,
        distribution: str,
        store: torch.device,
        block_size: int,
    ) -> None:
        self.op, self.backend, self.m, self.seed = operator, backend, m, seed
        self.distribution, self.store, self.block_size = distribution, store, block_size
        self.dtype = working_dtype(operator)
        self.gen = backend.generator(seed, operator.device)
        self.tensors: dict[str, torch.Tensor] = {}
        self.counters: dict[str, Any] = {}

    def draw(self, num: int) -> torch.Tensor:
        return draw_columns(
            self.backend,
            self.op,
            num,
            generator=self.gen,
            dtype=self.dtype,
            distribution=self.distribution,
        )

    def state(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "generator": generator_state(self.gen),
            "tensors": {k: t.cpu() for k, t in self.tensors.items()},
            "counters": dict(self.counters),
        }

    def load(self, saved: dict[str, Any]) -> None:
        self.seed = int(saved["seed"])
        restore_generator(self.gen, saved["generator"])
        self.tensors = {k: t.to(self._device_of(k)) for k, t in saved["tensors"].items()}
        self.counters = dict(saved["counters"])

    def _device_of(self, key: str) -> torch.device:
        return self.op.device

    def product(self, X: torch.Tensor) -> torch.Tensor:
        """``A X`` (moved to ``X``'s device), refusing non-finite columns."""
        try:
            out = self.op.matmat(X.to(self.op.device)).to(X.device)
        except NonFiniteError as err:
            raise self._error(self.used() + 1, err) from err
        bad = first_non_finite(out)
        if bad is not None:
            raise self._error(self.used() + bad + 1, None)
        return out

    def _error(self, first_bad: int, cause: NonFiniteError | None) -> Exception:
        partial = self.partial("non_finite")
        note = (
            "err.partial is None (fewer than 2 clean probes)"
            if partial is None
            else f"err.partial holds the estimate from the {partial.num_matvecs} products before it"
        )
        return non_finite_error(
            f"diagonal ({self.method})", self.op, first_bad, cause, partial, note
        )

    def make(
        self, est: torch.Tensor, se: torch.Tensor, used: int, details: dict[str, Any], stop: str
    ) -> DiagonalResult:
        return DiagonalResult(
            estimate=est,
            stderr=se,
            num_matvecs=used,
            operator_size=self.op.size,
            method=self.method,
            distribution=self.distribution,
            seed=self.seed,
            details=details,
            stop_reason=stop,
        )

    @abstractmethod
    def used(self) -> int:
        """Products made so far."""

    @abstractmethod
    def done(self) -> bool:
        """Whether the whole budget has been spent."""

    @abstractmethod
    def step(self) -> None:
        """Make the next block of products."""

    @abstractmethod
    def partial(self, stop: str) -> DiagonalResult | None:
        """The estimate of the products made (``None`` with fewer than 2 probes)."""

    @abstractmethod
    def result(self) -> DiagonalResult:
        """The final estimate."""


class _HutchinsonDiagonal(_Run):
    """Mean and standard error of ``omega_k * A omega_k`` (blockwise Chan et al. merge)."""

    method = "hutchinson"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        n_local = self.backend.local_size(self.op.size)
        mean = torch.zeros(n_local, dtype=torch.float64, device=self.op.device)
        self.tensors = {"mean": mean, "m2": torch.zeros_like(mean)}
        self.counters = {"count": 0}

    def used(self) -> int:
        return int(self.counters["count"])

    def done(self) -> bool:
        return self.used() >= self.m

    def step(self) -> None:
        count = self.used()
        b = min(self.block_size, self.m - count)
        omega = self.draw(b)
        X = (omega * self.product(omega)).to(torch.float64)
        block_mean = X.mean(dim=1)
        block_m2 = ((X - block_mean[:, None]) ** 2).sum(dim=1)
        mean, m2 = self.tensors["mean"], self.tensors["m2"]
        delta = block_mean - mean
        total = count + b
        self.tensors["mean"] = mean + delta * (b / total)
        self.tensors["m2"] = m2 + block_m2 + delta * delta * (count * b / total)
        self.counters["count"] = total

    def _estimate(self, stop: str) -> DiagonalResult:
        count = self.used()
        stderr = torch.sqrt(self.tensors["m2"] / (count - 1)) / math.sqrt(count)
        return self.make(self.tensors["mean"], stderr, count, {"num_probes": count}, stop)

    def partial(self, stop: str) -> DiagonalResult | None:
        return self._estimate(stop) if self.used() >= 2 else None

    def result(self) -> DiagonalResult:
        return self._estimate("completed")


class _XDiag(_Run):
    """XDiag with ``s = min(m // 2, n)`` probes; see the module docstring.

    Phases: ``"sketch"`` (``Y = A Omega`` by blocks), then QR, then ``"z"`` (``Z = A Q`` by
    blocks); a rank-deficient sketch goes to the fallback at once.
    """

    method = "xdiag"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.s = min(self.m // 2, self.op.size)
        omega = self.draw(self.s).to(self.store)
        self.tensors = {"omega": omega, "Y": torch.empty_like(omega)}
        self.counters = {"phase": "sketch", "col": 0}
        self.final: DiagonalResult | None = None

    def _device_of(self, key: str) -> torch.device:
        return self.store

    def used(self) -> int:
        phase, col = self.counters["phase"], int(self.counters["col"])
        return col if phase == "sketch" else self.s + col

    def done(self) -> bool:
        return self.final is not None

    def step(self) -> None:
        t, c = self.tensors, self.counters
        col, bs = int(c["col"]), self.block_size
        if c["phase"] == "sketch":
            block = t["omega"][:, col : col + bs]
            t["Y"][:, col : col + block.shape[1]] = self.product(block)
            c["col"] = col + block.shape[1]
            if c["col"] >= self.s:
                self._after_sketch()
        else:
            Qb = t["Q"][:, col : col + bs]
            t["Z"][:, col : col + Qb.shape[1]] = self.product(Qb)
            c["col"] = col + Qb.shape[1]
            if c["col"] >= self.s:
                self.final = self._finish()

    def _sketch_hutchinson(self, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        X = (self.tensors["omega"][:, :cols] * self.tensors["Y"][:, :cols]).to(torch.float64)
        return X.mean(dim=1), X.std(dim=1, correction=1) / math.sqrt(cols)

    def _after_sketch(self) -> None:
        t, s = self.tensors, self.s
        sk_mean, sk_se = self._sketch_hutchinson(s)
        Q, R = torch.linalg.qr(t["Y"])
        R64 = R.to(torch.float64)
        svals = torch.linalg.svdvals(R64)
        tol = s * float(torch.finfo(self.dtype).eps) * float(svals[0])
        rank = int((svals > tol).sum())
        if rank < s:
            est, se, used, details = _xdiag_rank_deficient(
                self.op, self.backend, Q, R64, rank, self.gen, self.distribution, self.block_size
            )
            if not bool(torch.isfinite(est).all() and torch.isfinite(se).all()):
                raise self._error(s + 1, None)
            self.final = self.make(est, se, used, details, "completed")
            return
        self.tensors = {
            "omega": t["omega"],
            "Q": Q,
            "R64": R64,
            "Z": torch.empty_like(Q),
            "sk_mean": sk_mean,
            "sk_se": sk_se,
        }
        self.counters = {"phase": "z", "col": 0, "rank": rank}

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
        estimate = D.mean(dim=1)
        stderr = D.std(dim=1, correction=1) / math.sqrt(s)
        details = {"sketch_size": s, "sketch_rank": int(self.counters["rank"])}
        return self.make(estimate, stderr, 2 * s, details, "completed")

    def partial(self, stop: str) -> DiagonalResult | None:
        if self.counters["phase"] == "sketch":
            cols = int(self.counters["col"])
            if cols < 2:
                return None
            mean, se = self._sketch_hutchinson(cols)
        else:
            cols = self.s
            mean, se = self.tensors["sk_mean"], self.tensors["sk_se"]
        details = {"partial_estimator": "hutchinson_on_sketch", "num_probes": cols}
        return self.make(mean, se, self.used(), details, stop)

    def result(self) -> DiagonalResult:
        return cast(DiagonalResult, self.final)  # set when done() became True


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

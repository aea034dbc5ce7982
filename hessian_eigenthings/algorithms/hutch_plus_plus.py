r"""Hutch++: sketch, deflate, and run Hutchinson on the rest (Meyer, Musco, Musco, Woodruff 2021).

With a budget of ``m`` products, Hutch++ draws a sketch ``S`` of ``k = m // 3`` probes,
orthonormalises ``Y = A S = Q R``, and splits

.. math::

    \mathrm{tr}(A) = \mathrm{tr}(Q^\top A Q) + \mathrm{tr}\big((I - QQ^\top) A
    (I - QQ^\top)\big),

computing the first term exactly (``k`` products) and the second with Hutchinson's
estimator on ``l = m - 2k`` fresh probes ``g_j`` projected by ``P = I - QQ^T``:

.. math::

    \widehat{\mathrm{tr}}(A) = \mathrm{tr}(Q^\top A Q)
    + \frac{1}{l} \sum_{j=1}^{l} (P g_j)^\top A (P g_j).

For PSD ``A`` this reaches relative error ``eps`` with ``O(1/eps)`` products instead of
Hutchinson's ``O(1/eps^2)``: the sketch captures the large eigenvalues, whose
contribution to the Hutchinson variance dominates.
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import Unpack

from hessian_eigenthings.algorithms._calls import ProbeCall
from hessian_eigenthings.algorithms._records import StopReason
from hessian_eigenthings.algorithms._run import LongRunOptions, drive
from hessian_eigenthings.algorithms._sketch import TraceRun, paired_dots
from hessian_eigenthings.algorithms.estimator_results import TraceResult
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = ["MIN_MATVECS_HUTCH_PLUS_PLUS", "hutch_plus_plus"]

# One sketch vector, its product with Q, and two residual probes for a standard error.
MIN_MATVECS_HUTCH_PLUS_PLUS = 4


def hutch_plus_plus(
    operator: CurvatureOperator,
    num_matvecs: int = 100,
    *,
    distribution: str = "rademacher",
    seed: int | None = None,
    max_sketch_size: int | None = None,
    sketch_device: torch.device | str | None = None,
    block_size: int = 32,
    backend: LinAlgBackend | None = None,
    **long_run: Unpack[LongRunOptions],
) -> TraceResult:
    """Estimate ``tr(A)`` with Hutch++ and an honest standard error.

    What the error bar covers: given the sketch ``Q``, the first term is exact and the
    second is a mean of ``l`` i.i.d. quadratic forms (the residual probes are independent
    of ``Q``) whose expectation is ``tr(P A P)``. So the estimate is unbiased conditional
    on the sketch, and ``stderr = std(residual forms, ddof=1) / sqrt(l)`` is the usual
    standard error of that mean: it covers exactly the randomness that remains once the
    sketch is drawn (the variance of the Hutchinson part on the deflated residual). The
    sketch itself introduces no bias, so the interval is honest for ``tr(A)``. With few
    residual probes the standard error is itself noisy: use Student-t quantiles with
    ``details["dof"] = l - 1`` degrees of freedom (at ``m = 10``, ``l = 4``, the 3-sigma
    interval covers ~94%, not 99.7%).

    On a flat part of the spectrum (e.g. a bulk of equal eigenvalues) the deflated
    residual ``P A P`` is close to the projector ``P``, whose Rademacher-Hutchinson
    variance grows with ``k``; Hutch++'s error then stops improving with ``m`` while
    XTrace's keeps falling (see ``docs/benchmarks/estimators.md``).

    Budget split: ``k = min(m // 3, max_sketch_size, n)`` sketch vectors, ``k`` products
    with ``Q``, and the remaining ``l = m - 2k`` products on residual probes (a cap on the
    sketch moves budget to the residual probes).

    Memory: the sketch ``Y`` / ``Q`` holds ``n * k`` numbers (``O(n m)``; with ``m = 300``
    and ``n = 10^8`` float32 parameters that is 40 GB), plus one block of
    ``block_size`` probes. Bound it with ``max_sketch_size`` and/or keep the sketch on
    another device with ``sketch_device="cpu"`` (each block is moved to the operator's
    device for its product).

    Args:
        operator: Symmetric operator ``A`` (PSD for the ``O(1/eps)`` guarantee; any
            symmetric ``A`` gives an unbiased estimate).
        num_matvecs: Total operator products ``m`` (at least 4).
        distribution: ``"rademacher"`` (default) or ``"gaussian"`` probes.
        seed: ``None`` draws a fresh seed (recorded in the result); an int reproduces.
        max_sketch_size: Upper bound on ``k``.
        sketch_device: Device that holds the sketch; default the operator's device.
        block_size: Probes per ``operator.matmat`` call.
        backend: Vector arithmetic; default ``operator.backend`` (whole vectors needed).
        **long_run: ``checkpoint``, ``checkpoint_every``, ``checkpoint_seconds``,
            ``time_limit`` (see :class:`~hessian_eigenthings.algorithms.LongRunOptions`).
            The checkpoint is written between blocks and holds the sketch (``O(n k)``
            numbers). A time-limited call returns, with at least 2 residual probes done,
            Hutch++ with those probes (``details["residual_probes"]`` says how many);
            before that, Hutchinson on the sketch probes done so far (``omega_i^T A
            omega_i`` from the sketch products, unbiased;
            ``details["partial_estimator"] = "hutchinson_on_sketch"``).

    Returns:
        A :class:`TraceResult`; ``samples`` are the ``l`` residual quadratic forms and
        ``details`` holds ``sketch_size``, ``residual_probes`` and ``low_rank_trace``.

    Raises:
        NonFiniteError: A product was inf/nan; ``err.partial`` is the partial estimate
            from the products before it (as for ``time_limit``), or ``None``.
    """
    probes = (distribution, seed, block_size, backend)
    call = ProbeCall.check(
        "hutch_plus_plus",
        "hutch++",
        MIN_MATVECS_HUTCH_PLUS_PLUS,
        operator,
        num_matvecs,
        probes,
        long_run,
        max_sketch_size=max_sketch_size,
        sketch_device=sketch_device,
        whole_vectors=True,
    )
    m, n, cap = call.num_matvecs, call.operator.size, call.max_sketch_size
    k = min(m // 3, n if cap is None else min(cap, n))
    run = _HutchPlusPlus(call, k, m - 2 * k)
    return drive(run, call.config(run.dtype, max_sketch_size=cap), call.long_run)


class _HutchPlusPlus(TraceRun):
    """Hutch++ as phases of column sweeps.

    ``"draw"`` (the sketch ``S``), ``"sketch"`` (``Y = A S`` and the sketch forms
    ``s_i^T y_i``), ``"low_rank"`` (``tr(Q^T A Q)`` with ``Q R = Y``), then
    ``"residual"`` (Hutchinson on ``P A P`` with fresh probes ``P g_j``).
    """

    algorithm = method = "hutch++"

    def __init__(self, call: ProbeCall, k: int, num_resid: int) -> None:
        super().__init__(call)
        self.k, self.num_resid = k, num_resid
        empty = torch.empty(0, dtype=self.dtype, device=self.store)
        self.S, self.Y, self.Q = empty, empty, empty
        self.sketch_forms = torch.empty(k, dtype=torch.float64, device=self.store)
        self.low_rank = torch.zeros((), dtype=torch.float64, device=self.store)
        self.forms = torch.empty(num_resid, dtype=torch.float64, device=self.store)

    def _offset(self) -> int:
        return {"draw": 0, "sketch": 0, "low_rank": self.k, "residual": 2 * self.k}[self.phase]

    def used(self) -> int:
        return self._offset() + self.col

    def done(self) -> bool:
        return self.phase == "residual" and self.col >= self.num_resid

    def _size(self) -> int:
        return {"draw": 0, "sketch": self.k, "low_rank": self.k}.get(self.phase, self.num_resid)

    def _advance(self) -> None:
        if self.phase == "draw":
            self.S = self.draw(self.k)
            self.Y = torch.empty_like(self.S)
            self._enter("sketch")
        elif self.phase == "sketch":
            self.Q, _ = torch.linalg.qr(self.Y)
            self.S = self.Y = self.S.new_empty(0)  # free the sketch
            self._enter("low_rank")
        else:
            self._enter("residual")

    def _columns(self, col: int, b: int) -> torch.Tensor:
        if self.phase == "sketch":
            return self.S[:, col : col + b]
        if self.phase == "low_rank":
            return self.Q[:, col : col + b]
        G = self.draw(b)
        G = G - self.Q @ (self.Q.T @ G)
        return G - self.Q @ (self.Q.T @ G)  # P G, orthogonal to Q

    def _take(self, col: int, X: torch.Tensor, AX: torch.Tensor) -> None:
        forms = paired_dots(self.backend, self.op.size, X, AX)
        if self.phase == "sketch":
            self.Y[:, col : col + X.shape[1]] = AX
            self.sketch_forms[col : col + X.shape[1]] = forms
        elif self.phase == "low_rank":
            self.low_rank = self.low_rank + forms.sum()
        else:
            self.forms[col : col + X.shape[1]] = forms

    def partial(self, stop_reason: StopReason) -> TraceResult | None:
        if self.phase == "residual" and self.col >= 2:
            return self._estimate(stop_reason)
        done = self.col if self.phase in ("draw", "sketch") else self.k
        return self._on_sketch(self.sketch_forms[:done], stop_reason, sketch_size=self.k)

    def result(self) -> TraceResult:
        return self._estimate("completed")

    def _estimate(self, stop_reason: StopReason) -> TraceResult:
        low, resid = float(self.low_rank), self.col
        return self._trace(
            self.forms[:resid].cpu().numpy(),
            stop_reason,
            offset=low,
            num_matvecs=2 * self.k + resid,
            details={
                "sketch_size": self.k,
                "residual_probes": resid,
                "low_rank_trace": low,
                "dof": resid - 1,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        resid = self.col if self.phase == "residual" else 0
        out: dict[str, Any] = {
            "phase": self.phase,
            "col": self.col,
            "sketch_forms": self.sketch_forms.cpu(),
            "low_rank": self.low_rank.cpu(),
            "forms": self.forms[:resid].cpu(),
        }
        if self.phase == "sketch":
            out["S"], out["Y"] = self.S.cpu(), self.Y.cpu()
        elif self.phase != "draw":
            out["Q"] = self.Q.cpu()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase, self.col = str(state["phase"]), int(state["col"])
        self.sketch_forms.copy_(state["sketch_forms"])
        self.low_rank = state["low_rank"].to(self.store)
        self.forms[: state["forms"].shape[0]] = state["forms"].to(self.store)
        if self.phase == "sketch":
            self.S, self.Y = state["S"].to(self.store), state["Y"].to(self.store)
        elif self.phase != "draw":
            self.Q = state["Q"].to(self.store)

r"""Thick-restart Lanczos with full reorthogonalisation and honest residuals.

:func:`lanczos` finds the ``k`` eigenpairs of a symmetric operator at one end of its
spectrum from matrix-vector products only.

The method (Wu & Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
problems", SIAM J. Matrix Anal. Appl. 22, 2000; Stathopoulos, Saad & Wu, "Dynamic thick
restarting of the Davidson, and the implicitly restarted Arnoldi methods", SISC 19, 1998):

1. Keep an orthonormal basis ``V = [v_1, ..., v_p]`` (rows of one matrix). The first ``q``
   vectors have been multiplied by ``A``; the remaining ``p - q`` are *pending* (the
   residual directions still to be expanded). Every product is orthogonalised against the
   whole basis by classical Gram-Schmidt, twice ("twice is enough": Kahan, reported in
   Parlett, *The Symmetric Eigenvalue Problem*, 1998; Giraud, Langou & Rozloznik 2005),
   which keeps ``V`` orthonormal to working precision and so rules out the ghost copies
   of plain Lanczos. The coefficients form ``H = V_p^T A V_q`` (``p x q``), and

   .. math::  A V_q = V_p H \quad\text{(exactly, up to rounding)}.

2. Rayleigh-Ritz in float64: ``T = (H_{qq} + H_{qq}^T)/2 = S \Theta S^T``
   (``torch.linalg.eigh`` on a float64 copy, whatever the operator dtype). For a Ritz pair
   ``(\theta, y = V_q s)`` the residual follows from the relation without a matvec:

   .. math::  \|A y - \theta y\|_2 = \|H s - \theta\,[s; 0]\|_2.

3. Thick restart: keep the ``l`` most wanted Ritz vectors ``V_q S_l`` plus the pending
   vectors, compress ``H`` to ``[S_l^T H_{qq} S_l;\ H_{pq} S_l]``, and expand again. The
   part of the relation that the compression cannot represent (from the tiny asymmetry
   of ``H_{qq}`` in floating point) is recorded and added to later residuals as a bound,
   so reported residuals stay upper bounds. A rounding allowance
   ``eps_vec * sqrt(p) * max_j |theta_j|`` for the vector arithmetic is added as well.

Convergence: pair ``i`` is converged when

.. math::  \|A y_i - \theta_i y_i\|_2 \le \mathrm{tol}\cdot
           \max\bigl(|\theta_i|,\ \epsilon^{1/3}\max_j|\theta_j|\bigr),

with ``epsilon`` the unit roundoff of the vector dtype and ``max_j |theta_j|`` the largest
Ritz value in magnitude (a lower bound of ``||A||``). For ``|theta_i|`` above the floor
this is ARPACK's criterion ``||r|| <= tol |theta|``, which bounds the relative eigenvalue
error by ``tol`` (and, for a gap ``g`` to the rest of the spectrum, by ``||r||^2/g``).

Repeated eigenvalues: a Krylov space of one start vector holds only one direction of each
eigenspace (in exact arithmetic), so a plain run can miss copies of a repeated eigenvalue
and still report every pair converged. When all ``k`` pairs first converge, this solver
therefore adds a fresh random vector (orthogonal to the basis) to the pending directions
(the expansion becomes a band Lanczos process that also explores the new direction) and
spends one more cycle's worth of products (``m - l``); it stops only when the ``k`` wanted
Ritz values are still converged and unchanged (within ``2 tol`` relative) after that, and
repeats the check otherwise. This is a probabilistic safeguard, not a proof: a copy whose
eigenvalue is barely separated from the ``(k+1)``-th can need more than one cycle.

Breakdown: when a product lies in the span of the basis (an invariant subspace, e.g.
``k == n``), detected as ``||w_orth|| <= eps_vec^(3/4) ||A v_j||`` at the next check, the
residual direction is dropped (its tiny norm is recorded in the residual bound), products
made after it in the same check interval are discarded (still counted in
``num_matvecs``), and a new random vector orthogonal to the basis continues the run.

Stagnation: a ``tol`` tighter than the dtype's default (:func:`default_tol`) may be out of
reach: rounding in the operator's products and in the vector arithmetic sets a floor under
the residuals, and the bounds then grow slowly with each restart (the terms the restarts
drop accumulate). For such a ``tol`` the run remembers the best Ritz pairs it has seen once
every wanted pair is below the default tolerance (most pairs meeting ``tol``, then the
smallest worst relative residual; a check whose wanted Ritz values moved, because a missing
eigenvalue or copy was found, replaces them whatever its residuals), and it has stalled when
the wanted values have not moved and their worst relative residual has not halved for five
cycles' worth of products (``5 (m - l)``, ``l`` the Ritz vectors kept at a restart) while
some pair still misses ``tol``. The first stall adds a verification vector, as convergence
does (repeated eigenvalues); the next one stops the run with ``stop_reason="stagnated"``,
returning the best pairs with honest flags, and warns once. Results cut short by the
budget or a time limit return the best pairs of the current set too, so a resumed run
never reports fewer converged pairs for the same eigenvalues than an earlier part did.
A tolerance below :func:`attainable_tol` (what the dtypes can certify at all) is warned
about before the run.

Long runs (see ``docs/concepts/long-runs.md``): ``checkpoint=`` writes the whole
:class:`LanczosState` (basis, projected matrix, counters, residual-bound terms, generator
state) at the top of the run's loop, at most every ``checkpoint_every`` products or
``checkpoint_seconds`` seconds; a resumed call continues with exactly the same
floating-point operations, so its result equals the uninterrupted run's bit for bit.
``time_limit=`` stops at the next check and returns the current Ritz pairs with honest
flags (``stop_reason="time_limit"``). A non-finite product is detected at the next check
(or at once by data operators); the state is rolled back to the products before it and a
:class:`~hessian_eigenthings.errors.NonFiniteError` carrying the Ritz pairs of
that clean state (``err.partial``) is raised.

Host synchronisation happens once per convergence check (to read ``H``): every
``max(4, m // 8)`` products and at each restart, never per basis vector; the per-vector
work (matvec, Gram-Schmidt, norms) stays on the device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from typing_extensions import Unpack

from hessian_eigenthings._compat import lanczos_reorthogonalize_none, legacy_keywords
from hessian_eigenthings.algorithms._calls import SolverCall
from hessian_eigenthings.algorithms._precision import (
    attainable_tol,
    default_tol,
    default_vector_dtype,
    eps,
)
from hessian_eigenthings.algorithms._records import StopReason
from hessian_eigenthings.algorithms._run import LongRunOptions, ProductFailure, ResumableRun, drive
from hessian_eigenthings.algorithms._validation import check_choice, check_int
from hessian_eigenthings.algorithms.checkpoint import generator_state, restore_generator
from hessian_eigenthings.algorithms.results import EigenResult
from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.backends.devices import canonical_device, host_zeros
from hessian_eigenthings.operators.base import CurvatureOperator

__all__ = [
    "LanczosProgress",
    "LanczosState",
    "attainable_tol",
    "default_basis_size",
    "default_tol",
    "default_vector_dtype",
    "lanczos",
]

_WHICH = ("LM", "LA", "SA")
# Progress means the worst relative residual fell below this fraction of its last best.
_PROGRESS = 0.5
# Cycles (of m - l products) without progress after which a run has stagnated.
_STALL_CYCLES = 5


def default_basis_size(k: int, n: int) -> int:
    """Default maximal basis size: ``min(n, max(2k + 1, 30))``.

    ARPACK's ``ncv`` rule with a floor of 30 instead of 20 (fewer matvecs on clustered
    spectra for small ``k``; see ``benchmarks/bench_lanczos_vs_arpack.py``).
    """
    return min(n, max(2 * k + 1, 30))


def _num_keep(k: int, m: int, q: int) -> int:
    """Ritz vectors kept at a restart: ``k`` plus 70% of the remaining room.

    Keeping many Ritz vectors (Wu & Simon 2000; Stathopoulos, Saad & Wu 1998) retains the
    information on the next eigenvalues that drives convergence; the fraction was tuned
    against ARPACK in ``benchmarks/bench_lanczos_vs_arpack.py``.
    """
    return max(k, min(q - 1, k + (7 * (m - k)) // 10))


@dataclass
class LanczosProgress:
    """What :func:`lanczos` passes to ``callback`` after every convergence check.

    Attributes:
        restart: Number of restarts so far.
        num_matvecs: Matrix-vector products so far.
        ritz_values: ``(k,)`` current approximations of the wanted eigenvalues (float64).
        residuals: ``(k,)`` their residual norms (upper bounds, see :func:`lanczos`).
        converged: ``(k,)`` which of them meet the tolerance.
        verifying: Whether a multiplicity-verification vector has been added.
    """

    restart: int
    num_matvecs: int
    ritz_values: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    verifying: bool


@dataclass
class LanczosState:
    """Complete state of a thick-restart Lanczos run (enough to continue it).

    Attributes:
        basis: ``(capacity, n_local)`` buffer; rows ``[0, num_basis)`` are the orthonormal
            basis, rows ``[0, num_processed)`` the vectors already multiplied by ``A``.
        projected: ``(capacity, capacity)`` float64 buffer on the device;
            ``projected[:num_basis, :num_processed] = V^T A V_q``.
        num_processed: ``q``, vectors multiplied by ``A`` since the last restart.
        num_basis: ``p``, basis vectors (processed plus pending).
        num_matvecs: Products with ``A`` spent in total.
        restarts: Completed cycles.
        seed: Seed of ``generator`` (reproduces the run).
        generator: Random generator on the operator's device.
        dropped: Residual-bound terms: for each, a float64 matrix ``M`` (columns over the
            processed coordinates) such that ``||M s||`` bounds the part of ``A V_q s`` that
            the stored relation no longer represents.
        reference: Wanted Ritz values when the last verification vector was added.
        since_verification: Products since that vector was added (-1: none yet).
        best: For a ``tol`` below the dtype's default: the wanted pairs of the best check
            (``values``, ``vectors``, ``residuals``, ``converged``, ``worst``), or ``None``.
        best_progress: Worst relative residual when progress was last made.
        progress_at: ``num_matvecs`` at that check.
    """

    basis: torch.Tensor
    projected: torch.Tensor
    num_processed: int
    num_basis: int
    num_matvecs: int
    restarts: int
    seed: int
    generator: torch.Generator
    dropped: list[torch.Tensor] = field(default_factory=list)
    reference: torch.Tensor | None = None
    since_verification: int = -1
    best: dict[str, torch.Tensor] | None = None
    best_progress: float = math.inf
    progress_at: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Every field as CPU tensors and plain numbers (what a checkpoint stores)."""
        return {
            "basis": self.basis.cpu(),
            "projected": self.projected.cpu(),
            "num_processed": self.num_processed,
            "num_basis": self.num_basis,
            "num_matvecs": self.num_matvecs,
            "restarts": self.restarts,
            "seed": self.seed,
            "generator": generator_state(self.generator),
            "dropped": [t.clone() for t in self.dropped],
            "reference": None if self.reference is None else self.reference.clone(),
            "since_verification": self.since_verification,
            "best": None if self.best is None else {k: v.cpu() for k, v in self.best.items()},
            "best_progress": self.best_progress,
            "progress_at": self.progress_at,
        }

    def load_dict(self, data: dict[str, Any]) -> None:
        """Restore the fields saved by :meth:`to_dict` (tensors onto this state's devices)."""
        saved = data["basis"]
        basis = self.basis
        if basis.shape != saved.shape or basis.dtype != saved.dtype:  # keeps pinning
            basis = torch.empty(
                saved.shape,
                dtype=saved.dtype,
                device=basis.device,
                pin_memory=basis.device.type == "cpu" and basis.is_pinned(),
            )
        self.basis = basis.copy_(saved)
        self.projected = data["projected"].to(self.projected.device)
        self.num_processed = int(data["num_processed"])
        self.num_basis = int(data["num_basis"])
        self.num_matvecs = int(data["num_matvecs"])
        self.restarts = int(data["restarts"])
        self.seed = int(data["seed"])
        restore_generator(self.generator, data["generator"])
        self.dropped = list(data["dropped"])
        self.reference = data["reference"]
        self.since_verification = int(data["since_verification"])
        best = data.get("best")
        self.best = None if best is None else {k: v.to(self.basis.device) for k, v in best.items()}
        self.best_progress = float(data.get("best_progress", math.inf))
        self.progress_at = int(data.get("progress_at", 0))


@dataclass
class _Ritz:
    """Rayleigh-Ritz data of one check (all float64 on the CPU)."""

    values: torch.Tensor  # (q,) Ritz values, wanted first
    vectors: torch.Tensor  # (q, q) coordinates s_i as columns, same order
    residuals: torch.Tensor  # (q,) residual bounds, same order
    scale: torch.Tensor  # (q,) max(|theta_i|, floor)
    h_qq: torch.Tensor  # (q, q) processed block of H
    h_pq: torch.Tensor  # (p - q, q) pending block of H


def _wanted_order(theta: torch.Tensor, which: str) -> torch.Tensor:
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True, stable=True)
    if which == "LA":
        return torch.argsort(theta, descending=True, stable=True)
    return torch.argsort(theta, descending=False, stable=True)


class _Lanczos(ResumableRun[EigenResult]):
    """The run: one :class:`LanczosState` plus the fixed configuration.

    A step is one pass of the original loop body: expand the basis by up to
    ``check_every`` products, handle breakdowns, then (once ``k`` vectors are processed)
    the Rayleigh-Ritz check, the callback, the stopping tests, the verification logic and
    the restart.
    """

    algorithm = "lanczos"

    def __init__(
        self,
        call: SolverCall,
        *,
        which: str,
        basis_size: int,
        max_matvecs: int,
        tol: float,
        vector_dtype: torch.dtype,
        reorthogonalize: bool,
        basis_device: torch.device,
        callback: Callable[[LanczosProgress], None] | None,
    ) -> None:
        super().__init__(call.operator, call.backend, call.seed)
        operator, backend, k, seed = call.operator, call.backend, call.k, call.seed
        self.callback = callback
        self.final: EigenResult | None = None
        self.k = k
        self.which = which
        self.m = basis_size
        self.max_matvecs = max_matvecs
        self.tol = tol
        self.dtype = vector_dtype
        self.passes = 2 if reorthogonalize else 1
        # Convergence is checked (one host sync) every few products, not only at restarts.
        self.check_every = max(4, basis_size // 8)
        # Products after a verification vector joins before the run may stop: one cycle.
        self.verify_steps = max(1, basis_size - _num_keep(k, basis_size, basis_size))
        # A tol below the dtype's default may be out of reach: track the best pairs.
        self.stall_level = default_tol(operator.dtype, vector_dtype)
        self.track = tol < self.stall_level
        self.stall_window = max(_STALL_CYCLES * self.verify_steps, 2 * self.check_every)
        self.n = operator.size
        self.eps = eps(vector_dtype)
        self.breakdown_tol = self.eps**0.75
        self.floor_factor = self.eps ** (1.0 / 3.0)
        device = basis_device
        self.basis_device = basis_device
        n_local = backend.local_size(self.n)
        capacity = self.m + 2
        self.state = LanczosState(
            basis=host_zeros(
                (capacity, n_local), dtype=vector_dtype, device=device, serves=operator.device
            ),
            projected=torch.zeros((capacity, capacity), dtype=torch.float64, device=device),
            num_processed=0,
            num_basis=0,
            num_matvecs=0,
            restarts=0,
            seed=seed,
            generator=self.gen,
        )
        self._add_random_vector()

    # -- vector work (device, no host sync) ---------------------------------------------

    def _orthogonalize(self, w: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Classical Gram-Schmidt of ``w`` against basis rows ``[0, p)``, ``passes`` times."""
        basis = self.state.basis[:p]
        coef = torch.zeros(p, dtype=w.dtype, device=w.device)
        for _ in range(self.passes):
            h = self.backend.gram(basis.T, w)
            w = w - h @ basis
            coef = coef + h
        return w, coef

    def _ensure_capacity(self, rows: int) -> None:
        st = self.state
        cap = st.basis.shape[0]
        if rows <= cap:
            return
        new_cap = max(rows, cap + 2)
        basis = host_zeros(
            (new_cap, st.basis.shape[1]),
            dtype=st.basis.dtype,
            device=st.basis.device,
            serves=self.op.device,
        )
        basis[:cap] = st.basis
        proj = torch.zeros((new_cap, new_cap), dtype=torch.float64, device=st.projected.device)
        proj[:cap, :cap] = st.projected
        st.basis, st.projected = basis, proj

    def _add_random_vector(self) -> None:
        """Append a random unit vector orthogonal to the basis (a new pending direction)."""
        st = self.state
        p = st.num_basis
        self._ensure_capacity(p + 1)
        r = self.backend.random(
            self.n, generator=st.generator, dtype=self.dtype, device=self.op.device
        ).to(self.basis_device)
        if p > 0:
            r, _ = self._orthogonalize(r, p)
            r, _ = self._orthogonalize(r, p)
        st.basis[p] = r / self.backend.norm(r)
        st.projected[p].zero_()
        st.num_basis = p + 1

    def _expand(
        self, steps: int
    ) -> tuple[list[tuple[int, int, torch.Tensor, torch.Tensor]], ProductFailure | None]:
        """Multiply the next ``steps`` pending vectors; return per-step breakdown data.

        A product the operator refused (a data operator's ``NonFiniteError``) stops the
        expansion and is returned: the state holds the products before it.
        """
        st = self.state
        log: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        for _ in range(steps):
            j, p = st.num_processed, st.num_basis
            self._ensure_capacity(p + 1)
            try:
                w = self.apply(st.basis[j], check=False)  # checked through its norms
            except ProductFailure as failure:
                return log, failure
            st.num_matvecs += 1
            w_norm = self.backend.norm(w)
            w, coef = self._orthogonalize(w, p)
            beta = self.backend.norm(w)
            st.projected[p].zero_()
            st.projected[:p, j] = coef.to(torch.float64)
            st.projected[p, j] = beta.to(torch.float64)
            tiny = torch.finfo(self.dtype).tiny
            st.basis[p] = w / beta.clamp_min(tiny)
            st.num_processed, st.num_basis = j + 1, p + 1
            log.append((j, p, beta, w_norm))
        return log, None

    # -- host side (float64, once per check) --------------------------------------------

    def _handle_breakdown(
        self,
        log: list[tuple[int, int, torch.Tensor, torch.Tensor]],
        failure: ProductFailure | None = None,
    ) -> None:
        """Truncate the cycle at the first product that lay in the span of the basis.

        A non-finite product rolls the state back to the products before it and ends the
        run (the driver raises ``NonFiniteError`` with the Ritz pairs of that state); so
        does a product the operator refused (``failure``), after the clean ones.
        """
        if log:
            norms = torch.stack([torch.stack([b, a]) for _, _, b, a in log])
            norms = norms.to("cpu", torch.float64)
            finite = torch.isfinite(norms).all(dim=1)
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
                self._roll_back(log[bad][0], log[bad][1])
                self.fail(self.state.num_matvecs - (len(log) - bad) + 1)
        if failure is not None:
            raise failure
        if not log:
            return
        broken = (norms[:, 0] <= self.breakdown_tol * norms[:, 1]).nonzero()
        if broken.numel() == 0:
            return
        t = int(broken[0, 0])
        j, p = log[t][0], log[t][1]
        beta = float(norms[t, 0])
        st = self.state
        # Discard everything created from step t on; remember the dropped coupling.
        st.num_processed, st.num_basis = j + 1, p
        st.projected[p:].zero_()
        st.projected[:, j + 1 :].zero_()
        if beta > 0:
            term = torch.zeros(1, j + 1, dtype=torch.float64)
            term[0, j] = beta
            st.dropped.append(term)
        if st.num_basis == st.num_processed and st.num_basis < self.n:
            self._add_random_vector()

    def _roll_back(self, j: int, p: int) -> None:
        """Forget product ``j`` (basis row ``p``) and everything after it."""
        st = self.state
        st.num_processed, st.num_basis = j, p
        st.projected[p:].zero_()
        st.projected[:, j:].zero_()

    def _ritz(self) -> _Ritz:
        st = self.state
        q, p = st.num_processed, st.num_basis
        h = st.projected[:p, :q].to("cpu")
        if not torch.isfinite(h).all():
            self.fail(st.num_matvecs, hint=" or before it (the projected matrix is not finite)")
        h_qq, h_pq = h[:q], h[q:]
        theta, s = torch.linalg.eigh((h_qq + h_qq.T) / 2)
        order = _wanted_order(theta, self.which)
        theta, s = theta[order], s[:, order]
        top = torch.cat([h_qq @ s - s * theta, h_pq @ s], dim=0)
        res = torch.linalg.vector_norm(top, dim=0)
        for term in self._padded_dropped(q):
            res = res + torch.linalg.vector_norm(term @ s, dim=0)
        anorm = theta.abs().max()
        # Rounding of the vector arithmetic (forming y = V^T s, the Gram-Schmidt sums).
        res = res + self.eps * math.sqrt(p) * anorm
        floor = self.floor_factor * anorm
        scale = torch.maximum(theta.abs(), floor)
        return _Ritz(theta, s, res, scale, h_qq, h_pq)

    def _restart(self, ritz: _Ritz) -> None:
        """Compress to the ``l`` most wanted Ritz vectors plus the pending vectors."""
        st = self.state
        q, p = st.num_processed, st.num_basis
        b = p - q
        keep = _num_keep(self.k, self.m, q)
        s_l = ritz.vectors[:, :keep]
        h_ll = s_l.T @ ritz.h_qq @ s_l
        h_bl = ritz.h_pq @ s_l
        lost = ritz.h_qq @ s_l - s_l @ h_ll  # part of A V_q S_l outside span(V_q S_l, pending)
        new_dropped = [term_pad @ s_l for term_pad in self._padded_dropped(q)]
        if float(lost.abs().max()) > 0:
            new_dropped.append(torch.linalg.qr(lost, mode="r")[1])
        st.dropped = new_dropped
        dev_s = s_l.to(device=st.basis.device, dtype=self.dtype)
        kept = dev_s.T @ st.basis[:q]
        pending = st.basis[q:p].clone()
        st.basis[:keep] = kept
        st.basis[keep : keep + b] = pending
        proj = torch.zeros_like(st.projected)
        proj[:keep, :keep] = h_ll.to(proj.device)
        proj[keep : keep + b, :keep] = h_bl.to(proj.device)
        st.projected = proj
        st.num_processed, st.num_basis = keep, keep + b
        st.restarts += 1

    def _padded_dropped(self, q: int) -> list[torch.Tensor]:
        out = []
        for term in self.state.dropped:
            padded = torch.zeros(term.shape[0], q, dtype=torch.float64)
            padded[:, : term.shape[1]] = term
            out.append(padded)
        return out

    # -- the run --------------------------------------------------------------------------

    def used(self) -> int:
        return self.state.num_matvecs

    def done(self) -> bool:
        return self.final is not None

    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_dict(state)

    def partial(self, stop_reason: StopReason) -> EigenResult | None:
        if self.state.num_processed < self.k:
            return None
        ritz = self._ritz()
        return self._best_result(
            ritz, ritz.residuals[: self.k] <= self.tol * ritz.scale[: self.k], stop_reason
        )

    def result(self) -> EigenResult:
        return cast(EigenResult, self.final)  # set when done() became True

    def step(self) -> None:
        st = self.state
        k = self.k
        steps = min(self.m - st.num_processed, self.max_matvecs - st.num_matvecs, self.check_every)
        log, failure = self._expand(steps) if steps > 0 else ([], None)
        if st.since_verification >= 0:
            st.since_verification += len(log)
        self._handle_breakdown(log, failure)
        if st.num_processed < k:
            if st.num_matvecs >= self.max_matvecs:
                raise RuntimeError(
                    f"lanczos spent its budget of {self.max_matvecs} matvecs but the "
                    f"operator's Krylov spaces gave only {st.num_processed} < k = {k} "
                    "independent directions (repeated breakdowns); raise max_iter."
                )
            return
        ritz = self._ritz()
        conv = ritz.residuals[:k] <= self.tol * ritz.scale[:k]
        stalled = self._track(ritz, conv)
        if self.callback is not None:
            self.callback(
                LanczosProgress(
                    restart=st.restarts,
                    num_matvecs=st.num_matvecs,
                    ritz_values=ritz.values[:k].clone(),
                    residuals=ritz.residuals[:k].clone(),
                    converged=conv.clone(),
                    verifying=st.since_verification >= 0,
                )
            )
        exhausted = st.num_processed >= self.n
        if exhausted:
            self.final = self._result(ritz, conv, "exhausted")
            return
        if stalled and st.since_verification < 0 and st.num_basis < self.n:
            # Stalled before any verification: as for converged pairs, a fresh random
            # direction joins and the run must stall again before it stops.
            st.reference = ritz.values[:k].clone()
            if st.num_processed >= self.m:
                self._restart(ritz)
            self._add_random_vector()
            st.since_verification, st.progress_at = 0, st.num_matvecs
            return
        if st.num_matvecs >= self.max_matvecs or stalled:
            reason: StopReason = "converged" if bool(conv.all()) else "max_iter"
            self.final = self._best_result(ritz, conv, "stagnated" if stalled else reason)
            return
        if bool(conv.all()):
            if st.reference is None or not self._unchanged(ritz, st.reference):
                # (Re)start verification: a fresh random direction joins the basis.
                st.reference = ritz.values[:k].clone()
                if st.num_basis < self.n:
                    if st.num_processed >= self.m:
                        self._restart(ritz)
                    self._add_random_vector()
                st.since_verification = 0
                return
            if st.since_verification >= self.verify_steps or st.num_basis >= self.n:
                self.final = self._result(ritz, conv, "converged")
                return
        if st.num_processed >= self.m:
            self._restart(ritz)

    def _track(self, ritz: _Ritz, conv: torch.Tensor) -> bool:
        """Remember the best pairs of a run whose ``tol`` may be out of reach.

        Only once every wanted pair is below the dtype's default tolerance. Returns whether
        the run has stagnated: some pair misses ``tol``, the wanted Ritz values have not
        moved and their worst relative residual has not halved for ``stall_window``
        products.
        """
        if not self.track:
            return False
        st, k = self.state, self.k
        worst = float((ritz.residuals[:k] / ritz.scale[:k]).max())
        if worst > self.stall_level:
            return False
        # A wanted Ritz value that moved (a missing eigenvalue or copy was found) starts
        # over: the new set is better whatever its residuals.
        moved = self._moved(ritz)
        if moved:
            st.best_progress = math.inf
        if worst < _PROGRESS * st.best_progress:
            st.best_progress, st.progress_at = worst, st.num_matvecs
        if (
            st.best is None
            or moved
            or self._score(conv, worst) > self._score(st.best["converged"], float(st.best["worst"]))
        ):
            vectors = self._vectors(ritz)
            st.best = {
                "values": ritz.values[:k].clone(),
                "vectors": vectors,
                "residuals": ritz.residuals[:k].clone(),
                "converged": conv.clone(),
                "worst": torch.tensor(worst, dtype=torch.float64),
            }
        stalled = st.num_matvecs - st.progress_at >= self.stall_window
        return stalled and not bool(conv.all())

    def _moved(self, ritz: _Ritz) -> bool:
        """Whether a wanted Ritz value differs from the best pairs' by more than the level."""
        best, k = self.state.best, self.k
        if best is None:
            return False
        delta = (ritz.values[:k] - best["values"]).abs()
        return bool((delta > self.stall_level * ritz.scale[:k]).any())

    @staticmethod
    def _score(conv: torch.Tensor, worst: float) -> tuple[int, float]:
        """Order of pairs sets: more pairs meeting ``tol``, then a smaller worst residual."""
        return int(conv.sum()), -worst

    def _best_result(self, ritz: _Ritz, conv: torch.Tensor, stop_reason: StopReason) -> EigenResult:
        """The current pairs, or the remembered best ones of the same set if they score higher."""
        best = self.state.best
        if best is not None and not self._moved(ritz):
            worst = float((ritz.residuals[: self.k] / ritz.scale[: self.k]).max())
            if self._score(best["converged"], float(best["worst"])) > self._score(conv, worst):
                return self._make(
                    best["values"].clone(),
                    best["vectors"].clone(),
                    best["residuals"].clone(),
                    best["converged"].clone(),
                    stop_reason,
                )
        return self._result(ritz, conv, stop_reason)

    def _unchanged(self, ritz: _Ritz, reference: torch.Tensor) -> bool:
        delta = (ritz.values[: self.k] - reference).abs()
        return bool((delta <= 2 * self.tol * ritz.scale[: self.k]).all())

    def _vectors(self, ritz: _Ritz) -> torch.Tensor:
        """The ``(k, n_local)`` wanted Ritz vectors ``(V_q s_i)^T``."""
        st = self.state
        s_k = ritz.vectors[:, : self.k].to(device=st.basis.device, dtype=self.dtype)
        return s_k.T @ st.basis[: st.num_processed]

    def _result(self, ritz: _Ritz, conv: torch.Tensor, stop_reason: StopReason) -> EigenResult:
        k = self.k
        return self._make(
            ritz.values[:k].clone(),
            self._vectors(ritz),
            ritz.residuals[:k].clone(),
            conv.clone(),
            stop_reason,
        )

    def _make(
        self,
        values: torch.Tensor,
        vectors: torch.Tensor,
        residuals: torch.Tensor,
        conv: torch.Tensor,
        stop_reason: StopReason,
    ) -> EigenResult:
        st = self.state
        return EigenResult(
            eigenvalues=values,
            eigenvectors=vectors,
            residuals=residuals,
            converged=conv,
            iterations=st.restarts + 1,
            num_matvecs=st.num_matvecs,
            which=self.which,
            tol=self.tol,
            seed=st.seed,
            method="lanczos",
            stop_reason=stop_reason,
        )


@legacy_keywords(translate=lanczos_reorthogonalize_none)
def lanczos(
    operator: CurvatureOperator,
    k: int = 10,
    *,
    which: str = "LM",
    max_iter: int | None = None,
    tol: float | None = None,
    seed: int | None = None,
    reorthogonalize: bool = True,
    backend: LinAlgBackend | None = None,
    callback: Callable[[LanczosProgress], None] | None = None,
    basis_size: int | None = None,
    vector_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    **long_run: Unpack[LongRunOptions],
) -> EigenResult:
    r"""Top-``k`` eigenpairs of a symmetric operator by thick-restart Lanczos.

    See the module docstring for the algorithm. Restarts until the ``k`` wanted Ritz pairs
    meet ``tol`` (and a verification cycle from a fresh random vector confirms that no
    copy of a repeated eigenvalue is missing) or until ``max_iter`` matvecs are spent.

    Args:
        operator: Symmetric :class:`~hessian_eigenthings.operators.CurvatureOperator`.
        k: Number of eigenpairs, ``1 <= k <= operator.size``.
        which: ``"LM"`` largest magnitude, ``"LA"`` largest algebraic, ``"SA"`` smallest
            algebraic.
        max_iter: Budget of matrix-vector products (not restarts); default
            ``100 * basis_size``. When it runs out, the best ``k`` Ritz pairs are returned
            with ``converged`` flags that say which met ``tol``.
        tol: Relative residual tolerance, ``||A y - theta y|| <= tol * max(|theta|,
            eps_vec^(1/3) * max_j |theta_j|)``; default :func:`default_tol` (float64:
            1.5e-8, float32: 3.5e-4, bfloat16 operator: 3.1e-2). A tighter ``tol`` may be
            out of the dtype's reach: below :func:`attainable_tol` a ``UserWarning`` says so
            before the run; otherwise a run whose residuals stop decreasing stops with
            ``stop_reason="stagnated"`` (module docstring) and warns. One warning per call.
        seed: Seed of the random start (and verification) vectors; ``None`` draws a fresh
            one from the OS (recorded in ``result.seed``).
        reorthogonalize: Two Gram-Schmidt passes against the whole basis per product
            (default); ``False`` does a single pass, which halves that cost but lets
            orthogonality degrade for ill-conditioned bases. The basis is never left
            unorthogonalised (that is what produces ghost eigenvalues).
        backend: Vector backend; default ``operator.backend``.
        callback: Called after every convergence check (every few products and at
            each restart) with a :class:`LanczosProgress`.
        basis_size: Maximal basis size ``m`` (ARPACK's ``ncv``); default
            :func:`default_basis_size`. Memory is ``(m + 2) * n`` vector entries (more
            only if repeated verifications add pending directions). Restarts keep
            ``k + 0.7 (m - k)`` Ritz vectors.
        vector_dtype: Dtype of the Lanczos vectors; default the operator's dtype, or
            float32 for bfloat16/float16 operators (vectors in higher precision than the
            model, the products are taken in the operator's dtype). A dtype less precise
            than the operator's is refused: Gram-Schmidt against a rounded basis leaves it
            orthonormal only to that precision, and the residual bounds would not hold.
        basis_device: Device that holds the basis (and the projected matrix); default
            the operator's. ``"cpu"`` with a GPU operator keeps the ``(m + 2) n`` basis in
            host memory (page-locked, so the copies need no staging buffer); cost per
            product: one vector copied to the GPU and one back (``2 n`` entries over PCIe)
            and the Gram-Schmidt work (``4 p n`` flops for two passes) done on the CPU.
            Eigenvectors are returned on this device.
        **long_run: ``checkpoint``, ``checkpoint_every``, ``checkpoint_seconds``,
            ``time_limit`` (see :class:`~hessian_eigenthings.algorithms.LongRunOptions`).
            The checkpoint holds the whole :class:`LanczosState` and is written at
            convergence checks; a time-limited call (checked at every convergence check,
            once ``k`` products exist) returns the current Ritz pairs with their honest
            ``converged`` flags.

    Returns:
        An :class:`~hessian_eigenthings.algorithms.results.EigenResult` ordered by
        ``which``, with ``stop_reason`` ``"converged"``, ``"max_iter"``, ``"exhausted"``,
        ``"stagnated"`` or ``"time_limit"``. After ``"max_iter"``, ``"stagnated"`` and
        ``"time_limit"`` with a ``tol`` below the default, the pairs are the best ones seen
        (see the module docstring), not necessarily those of the last products.
        ``residuals`` are upper bounds of ``||A v_i - lambda_i v_i||`` with respect to the
        products the operator returned, computed from the Lanczos relation (no extra
        matvec), exact up to rounding of the vector arithmetic (of order
        ``eps_vec * ||A||``, for which an allowance is included); for a reduced-precision
        operator its own rounding comes on top. ``iterations`` counts cycles
        (restarts + 1), ``num_matvecs`` products.

    Raises:
        TypeError: ``operator`` is not a CurvatureOperator, or ``seed`` not an int.
        ValueError: Non-symmetric operator, ``k`` outside ``[1, n]``, unknown ``which``,
            ``max_iter < k``, or ``tol`` outside ``(0, 1)``.
        NonFiniteError: The operator produced inf/nan (a ``FloatingPointError`` and
            ``ValueError``); ``err.partial`` holds the Ritz pairs computed before it.
        CheckpointMismatchError: ``checkpoint`` belongs to another operator or arguments.
        CorruptCheckpointError: ``checkpoint`` is truncated or corrupt.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> op = LambdaOperator(lambda v: A @ v, 100, dtype=torch.float64)
        >>> eigenvalues, eigenvectors = lanczos(op, k=3, seed=0)
        >>> torch.allclose(eigenvalues, torch.tensor([100.0, 99.0, 98.0], dtype=torch.float64))
        True
    """
    call = SolverCall.check(
        "lanczos", operator, k, tol=tol, seed=seed, backend=backend, long_run=long_run
    )
    n, k = call.operator.size, call.k
    which = check_choice(which, _WHICH, "which")
    if max_iter is not None:
        why = ": each of the k Ritz pairs needs at least one product with the operator"
        max_iter = check_int(max_iter, "max_iter (the matvec budget)", k, why=why)
    if basis_size is not None:
        basis_size = check_int(basis_size, "basis_size", min(k + 1, n), n)
    op_dtype = call.operator.dtype
    vdtype = vector_dtype or default_vector_dtype(op_dtype)
    if not vdtype.is_floating_point or eps(vdtype) > eps(op_dtype):
        raise TypeError(
            f"vector_dtype must be a floating dtype at least as precise as the operator's "
            f"{op_dtype}, got {vdtype}."
        )
    m = basis_size if basis_size is not None else default_basis_size(k, n)
    tol_ = call.tol if call.tol is not None else default_tol(op_dtype, vdtype)
    floor = attainable_tol(op_dtype, vdtype, m)
    warned = tol_ < floor
    if warned:
        warnings.warn(
            f"lanczos: tol={tol_:.3g} is below what a {op_dtype} operator with {vdtype} "
            f"vectors can certify (about {floor:.2g}: the products' rounding and the residual "
            "bounds' allowance for the vector arithmetic). The run stops when its residuals "
            "stop decreasing (stop_reason='stagnated') and returns the best pairs with honest "
            f"converged flags. Pass tol >= {floor:.2g}, or use a float64 operator.",
            UserWarning,
            stacklevel=2,
        )
    max_matvecs = max_iter if max_iter is not None else 100 * m
    run = _Lanczos(
        call,
        which=which,
        basis_size=m,
        max_matvecs=max_matvecs,
        tol=tol_,
        vector_dtype=vdtype,
        reorthogonalize=reorthogonalize,
        basis_device=canonical_device(
            call.operator.device if basis_device is None else basis_device
        ),
        callback=callback,
    )
    config = {"k": k, "which": which, "max_iter": max_matvecs, "tol": tol_, "seed": call.seed_arg}
    result = drive(
        run,
        {**config, "reorthogonalize": reorthogonalize, "basis_size": m, "vector_dtype": vdtype},
        call.long_run,
    )
    if result.stop_reason == "stagnated" and not warned:
        reached = float((result.residuals / result.eigenvalues.abs().clamp_min(1e-300)).max())
        warnings.warn(
            f"lanczos stopped after {result.num_matvecs} products: the residuals stopped "
            f"decreasing at {reached:.2g} (relative), above tol={tol_:.3g}. That is the "
            f"precision this {op_dtype} operator delivers (rounding in its products); the best "
            f"pairs are returned (stop_reason='stagnated'). Pass tol >= {reached:.2g}, or "
            "compute the operator in float64.",
            UserWarning,
            stacklevel=2,
        )
    return result

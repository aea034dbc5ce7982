"""Matvec budgets and wall-clock limits: partial results with honest flags.

No timing is asserted: ``time_limit=1e-9`` has always passed at the first check, which
makes the cut deterministic. Oracles: the dense float64 matrix (true residuals), and the
uninterrupted run (partial results are its first products' results; repeated
time-limited calls with a checkpoint reach it bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hessian_eigenthings import (
    EigenResult,
    LambdaOperator,
    deflated_power_iteration,
    diagonal,
    lanczos,
    power_iteration_one,
    spectral_density,
    stochastic_power_iteration,
    trace,
)
from tests._long_run_problems import matrix, operator
from tests.test_checkpoint import IN_PROCESS, assert_same

A = matrix()
TINY = 1e-9


def _check_eigen_partial(res: EigenResult) -> None:
    """True residuals are bounded by the reported ones; flags follow the tolerance."""
    for lam, v, r in zip(res.eigenvalues, res.eigenvectors, res.residuals):
        assert torch.linalg.vector_norm(A @ v - lam * v) <= r * (1 + 1e-6) + 1e-12
    if res.method in ("lanczos", "power_iteration", "deflated_power_iteration"):
        scale = res.eigenvalues.abs()
        assert not bool((res.converged & (res.residuals > res.tol * scale * 1.0001)).any())


def test_lanczos_matvec_budget_returns_honest_partial_pairs() -> None:
    full = lanczos(operator(), k=4, seed=3, basis_size=14, tol=1e-12)
    assert full.stop_reason == "converged" and full.all_converged
    cut = lanczos(operator(), k=4, seed=3, basis_size=14, tol=1e-12, max_iter=20)
    assert cut.stop_reason == "max_iter"
    assert cut.num_matvecs == 20
    assert not cut.all_converged
    _check_eigen_partial(cut)


def test_lanczos_time_limit_returns_honest_partial_pairs() -> None:
    cut = lanczos(operator(), k=4, seed=3, basis_size=14, tol=1e-12, time_limit=TINY)
    full = lanczos(operator(), k=4, seed=3, basis_size=14, tol=1e-12)
    assert cut.stop_reason == "time_limit"
    assert 4 <= cut.num_matvecs < full.num_matvecs
    assert cut.eigenvalues.shape == (4,) and cut.eigenvectors.shape == (4, 60)
    _check_eigen_partial(cut)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace_time_limit_returns_the_estimate_of_the_products_made(method: str) -> None:
    full = trace(operator(), 90, method=method, seed=7, block_size=3)
    assert full.stop_reason == "completed"
    cut = trace(operator(), 90, method=method, seed=7, block_size=3, time_limit=TINY)
    assert cut.stop_reason == "time_limit"
    assert 2 <= cut.num_matvecs < full.num_matvecs
    assert np.isfinite(cut.estimate) and np.isfinite(cut.stderr) and cut.stderr > 0
    samples = cut.samples
    assert cut.estimate == pytest.approx(float(samples.mean()), rel=1e-12)
    assert cut.stderr == pytest.approx(float(samples.std(ddof=1) / np.sqrt(samples.size)))
    if method == "hutchinson":
        assert np.array_equal(samples, full.samples[: samples.size])
        assert cut.num_matvecs == samples.size
    else:
        assert cut.details["partial_estimator"] == "hutchinson_on_sketch"
        assert cut.details["num_probes"] == samples.size


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_slq_time_limit_returns_the_runs_cut_at_the_step_they_reached(block_size: int) -> None:
    """The limit is read between Lanczos steps: after the first step (one block product
    for the first group of runs), every run started is a one-node Gauss rule at its
    probe's Rayleigh quotient ``v^T A v / ||v||^2`` (matching the moments 0 and 1)."""
    from hessian_eigenthings.backends import SingleDeviceBackend
    from hessian_eigenthings.backends.base import seeded_generator

    kw: dict[str, Any] = {"num_runs": 6, "lanczos_steps": 12, "seed": 5, "block_size": block_size}
    full = spectral_density(operator(), **kw)
    cut = spectral_density(operator(), time_limit=TINY, **kw)
    assert cut.stop_reason == "time_limit" and full.stop_reason == "completed"
    started = min(block_size, 6)
    assert cut.num_runs == started and cut.num_matvecs == started
    A, gen = matrix(), seeded_generator(5, torch.device("cpu"))
    for nodes, weights in zip(cut.nodes, cut.weights):
        v = SingleDeviceBackend().random(
            A.shape[0],
            generator=gen,
            dtype=A.dtype,
            device=torch.device("cpu"),
            distribution="rademacher",
        )
        assert nodes.shape == (1,) and weights[0] == pytest.approx(1.0)
        assert nodes[0] == pytest.approx(float(v @ A @ v / (v @ v)), rel=1e-12)
    assert abs(cut.integral() - 1.0) < 1e-3


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_time_limit_returns_the_estimate_of_the_products_made(method: str) -> None:
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return A @ x

    rec = LambdaOperator(record, 60, dtype=torch.float64, matmat_fn=record)
    full = diagonal(operator(), 60, method=method, seed=2, block_size=4)
    cut = diagonal(rec, 60, method=method, seed=2, block_size=4, time_limit=TINY)
    assert cut.stop_reason == "time_limit" and full.stop_reason == "completed"
    assert cut.num_matvecs == 4 < full.num_matvecs
    # Exactly the mean of omega * A omega over the probes the operator received.
    omega = torch.cat(seen, dim=1)
    assert omega.shape == (60, 4)
    expected = (omega * (A @ omega)).mean(dim=1)
    assert torch.allclose(cut.estimate, expected, rtol=0, atol=1e-12)
    if method == "xdiag":
        assert cut.details["partial_estimator"] == "hutchinson_on_sketch"


def test_power_iterations_time_limit() -> None:
    one = power_iteration_one(operator(), max_iter=500, seed=1, time_limit=TINY)
    assert one.stop_reason == "time_limit" and one.num_matvecs == 4
    _check_eigen_partial(one)
    defl = deflated_power_iteration(operator(), 3, max_iter=500, seed=1, time_limit=TINY)
    assert defl.stop_reason == "time_limit" and defl.k == 1 and defl.num_matvecs == 4
    _check_eigen_partial(defl)
    sto = stochastic_power_iteration(operator(), 2, max_iter=100, seed=1, time_limit=TINY)
    assert sto.stop_reason == "time_limit" and sto.k == 1 and sto.num_matvecs == 16
    assert sto.num_samples == 16
    assert torch.equal(sto.converged, sto.eigenvalue_stderr <= sto.tol * sto.eigenvalues.abs())


@pytest.mark.parametrize("name", sorted(IN_PROCESS))
def test_repeated_time_limited_calls_reach_the_uninterrupted_result(
    name: str, tmp_path: Path
) -> None:
    """A job that keeps hitting its time limit continues from its checkpoint each time."""
    run: Callable[..., Any] = IN_PROCESS[name]
    reference = run(operator())
    path = tmp_path / "run.ckpt"
    calls = 0
    while True:
        calls += 1
        assert calls < 500, "no progress across time-limited calls"
        res = run(operator(), checkpoint=path, checkpoint_every=10**9, time_limit=TINY)
        if res.stop_reason != "time_limit":
            break
        assert path.exists(), "a run stopped by its time limit keeps its checkpoint"
    assert calls > 2
    assert_same(res, reference)
    assert not path.exists()


def test_bad_time_limit() -> None:
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="time_limit"):
            lanczos(operator(), k=2, seed=0, time_limit=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="time_limit"):
            trace(operator(), 20, seed=0, time_limit=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["xtrace", "xdiag"])
def test_time_limit_stops_inside_the_rank_deficient_fallback(method: str, tmp_path: Path) -> None:
    """The fallback of a rank-deficient sketch makes its products in checked blocks too."""
    from tests._long_run_problems import low_rank

    def run(**kw: Any) -> Any:
        op = low_rank(operator())
        if method == "xtrace":
            return trace(op, 40, method="xtrace", seed=4, block_size=3, **kw)
        return diagonal(op, 40, method="xdiag", seed=4, block_size=3, **kw)

    full = run()
    s = full.details["sketch_size"]
    assert full.details["sketch_rank"] < s  # the fallback ran
    path = tmp_path / "run.ckpt"
    cuts = []
    while True:
        res = run(checkpoint=path, checkpoint_every=10**9, time_limit=TINY)
        if res.stop_reason != "time_limit":
            break
        cuts.append(res)
    inside = [c for c in cuts if s < c.num_matvecs < 2 * s]
    assert len(inside) >= 3, [c.num_matvecs for c in cuts]
    for cut in inside:  # Hutchinson on the s sketch probes, honest about the products made
        assert cut.details["partial_estimator"] == "hutchinson_on_sketch"
        assert cut.details["num_probes"] == s
    assert_same(res, full)

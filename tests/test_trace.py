"""Trace estimators over many seeds against dense float64 ground truth.

Properties: unbiasedness, the accuracy ordering Hutchinson << Hutch++ <= XTrace on PSD
spectra with outliers and a flat bulk, 3-sigma coverage >= 90%, exactness where the
sketch captures the whole range, the XTrace algebra against a brute-force leave-one-out
oracle, seeds, memory options, bad input, a real HessianOperator, JSON round trip.
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import HessianOperator, LambdaOperator, SingleDeviceBackend
from hessian_eigenthings.algorithms.estimator_results import TraceResult
from hessian_eigenthings.algorithms.hutch_plus_plus import hutch_plus_plus
from hessian_eigenthings.algorithms.hutchinson import hutchinson
from hessian_eigenthings.algorithms.trace import trace
from hessian_eigenthings.algorithms.xtrace import xtrace
from tests.helpers import dense_hessian

DT = torch.float64
METHODS = ("hutchinson", "hutch++", "xtrace")
SEEDS = range(200)


def spectral_op(
    eigs: np.ndarray, seed: int = 0, dtype: torch.dtype = DT
) -> tuple[torch.Tensor, LambdaOperator]:
    """A = U diag(eigs) U^T (random orthogonal U), with a vectorised matmat."""
    n = len(eigs)
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (U * torch.as_tensor(eigs, dtype=DT)) @ U.T
    A = (0.5 * (A + A.T)).to(dtype)
    op = LambdaOperator(lambda v: A @ v, n, dtype=dtype, matmat_fn=lambda V: A @ V)
    return A, op


def outliers_and_bulk(n: int = 300) -> np.ndarray:
    """PSD: 10 outliers from 30 to 1000 over a flat bulk of ones."""
    outliers = np.array([1000.0, 500.0, 300.0, 200.0, 100.0, 80.0, 60.0, 50.0, 40.0, 30.0])
    return np.concatenate([outliers, np.ones(n - outliers.size)])


def indefinite(n: int = 200) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.concatenate([[60.0, -40.0, 25.0], rng.normal(0.0, 2.0, n - 3)])


@pytest.fixture(scope="module")
def psd_case() -> tuple[float, LambdaOperator]:
    eigs = outliers_and_bulk()
    _, op = spectral_op(eigs)
    return float(eigs.sum()), op


@pytest.fixture(scope="module")
def runs(psd_case: tuple[float, LambdaOperator]) -> dict[str, list[TraceResult]]:
    """Every method at 102 matvecs over 200 seeds on the outliers + bulk spectrum."""
    _, op = psd_case
    return {m: [trace(op, 102, method=m, seed=s) for s in SEEDS] for m in METHODS}


def test_accuracy_ordering_on_outliers_and_bulk(
    psd_case: tuple[float, LambdaOperator], runs: dict[str, list[TraceResult]]
) -> None:
    truth, _ = psd_case
    err = {m: float(np.mean([abs(r.estimate - truth) for r in runs[m]])) for m in METHODS}
    ratio_hpp = err["hutchinson"] / err["hutch++"]
    ratio_xt = err["hutchinson"] / err["xtrace"]
    print(
        f"\nmean |error| / trace at 102 matvecs over {len(SEEDS)} seeds: "
        + ", ".join(f"{m}={err[m] / truth:.2e}" for m in METHODS)
        + f"; hutchinson/hutch++={ratio_hpp:.0f}x, hutchinson/xtrace={ratio_xt:.0f}x, "
        f"hutch++/xtrace={err['hutch++'] / err['xtrace']:.1f}x"
    )
    assert ratio_hpp >= 20.0
    assert ratio_xt >= 20.0
    assert err["xtrace"] <= err["hutch++"]
    assert all(r.num_matvecs <= 102 for m in METHODS for r in runs[m])


@pytest.mark.parametrize("method", METHODS)
def test_three_sigma_intervals_cover_the_truth(
    method: str, psd_case: tuple[float, LambdaOperator], runs: dict[str, list[TraceResult]]
) -> None:
    truth, _ = psd_case
    z = np.array([(r.estimate - truth) / r.stderr for r in runs[method]])
    coverage = float(np.mean(np.abs(z) <= 3.0))
    print(f"\n{method}: 3-sigma coverage {coverage:.3f}, std of z-scores {np.std(z):.2f}")
    assert coverage >= 0.90
    # not vacuous either: the error bars are not grossly inflated
    assert float(np.mean(np.abs(z) <= 1.0)) <= 0.95


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_unbiased_on_an_indefinite_spectrum(method: str, distribution: str) -> None:
    eigs = indefinite()
    _, op = spectral_op(eigs, seed=2)
    est = np.array(
        [trace(op, 24, method=method, distribution=distribution, seed=s).estimate for s in SEEDS]
    )
    se_of_mean = est.std(ddof=1) / math.sqrt(est.size)
    assert abs(est.mean() - eigs.sum()) <= 4.0 * se_of_mean


@pytest.mark.parametrize("method", METHODS)
def test_coverage_on_an_indefinite_spectrum(method: str) -> None:
    eigs = indefinite()
    _, op = spectral_op(eigs, seed=2)
    res = [trace(op, 40, method=method, seed=s) for s in range(100)]
    coverage = np.mean([abs(r.estimate - eigs.sum()) <= 3.0 * r.stderr for r in res])
    assert coverage >= 0.90


def test_float32_operator() -> None:
    eigs = outliers_and_bulk(200)
    _, op = spectral_op(eigs, dtype=torch.float32)
    for method in METHODS:
        res = [trace(op, 60, method=method, seed=s) for s in range(40)]
        coverage = np.mean([abs(r.estimate - eigs.sum()) <= 3.0 * r.stderr for r in res])
        assert coverage >= 0.90, method


def test_rademacher_hutchinson_is_exact_on_a_diagonal_matrix() -> None:
    d = torch.linspace(-1.0, 3.0, 30, dtype=DT)
    op = LambdaOperator(lambda v: d * v, 30, dtype=DT)
    res = hutchinson(op, 5, seed=0)
    assert res.estimate == pytest.approx(float(d.sum()), abs=1e-12)
    assert res.stderr == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_sketch_covering_the_range_is_exact(method: str) -> None:
    # rank-5 A: the sketch spans range(A), so only rounding is left
    eigs = np.concatenate([[9.0, 7.0, 5.0, -3.0, 2.0], np.zeros(95)])
    _, op = spectral_op(eigs, seed=4)
    res = trace(op, 40, method=method, seed=1)
    assert res.estimate == pytest.approx(20.0, abs=1e-9)
    assert res.stderr <= 1e-9
    if method == "xtrace":
        assert res.details["sketch_rank"] == 5
        # fallback: s products for Y, r for Q_r^T A Q_r, s - r on fresh residual probes
        assert res.num_matvecs == 40 and res.details["dof"] == 14
    # budget >= 2n: the sketch is the whole space
    small = np.linspace(1.0, 2.0, 12)
    _, op12 = spectral_op(small, seed=5)
    full = trace(op12, 40, method=method, seed=2)
    assert full.estimate == pytest.approx(small.sum(), abs=1e-9)


def _brute_force_xtrace(
    op: LambdaOperator, A: torch.Tensor, s: int, seed: int, distribution: str
) -> np.ndarray:
    """Leave-one-out estimates t_i computed literally: Q_(i) = orth(Y without column i)."""
    n = op.size
    gen = torch.Generator().manual_seed(seed)
    Om = (
        SingleDeviceBackend()
        .random(
            n, num=s, generator=gen, dtype=DT, device=torch.device("cpu"), distribution=distribution
        )
        .T.numpy()
    )
    improved = distribution == "gaussian"
    if improved:
        Om = Om * math.sqrt(n) / np.linalg.norm(Om, axis=0)
    An = A.numpy()
    Y = An @ Om
    t = np.empty(s)
    for i in range(s):
        Qi, _ = np.linalg.qr(np.delete(Y, i, axis=1))
        P = np.eye(n) - Qi @ Qi.T
        u = P @ Om[:, i]
        if improved:
            u = u * math.sqrt(n - s + 1) / np.linalg.norm(u)
        t[i] = np.trace(Qi.T @ An @ Qi) + u @ An @ u
    return t


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_xtrace_matches_the_brute_force_leave_one_out_oracle(distribution: str) -> None:
    eigs = outliers_and_bulk(80)
    A, op = spectral_op(eigs, seed=6)
    res = xtrace(op, 20, distribution=distribution, seed=11)
    want = _brute_force_xtrace(op, A, 10, 11, distribution)
    np.testing.assert_allclose(res.samples, want, rtol=1e-9, atol=1e-9 * eigs.sum())
    assert res.estimate == pytest.approx(want.mean(), rel=1e-12)
    assert res.stderr == pytest.approx(want.std(ddof=1) / math.sqrt(10), rel=1e-7)


def test_hutch_plus_plus_split_and_oracle() -> None:
    eigs = outliers_and_bulk(80)
    A, op = spectral_op(eigs, seed=6)
    res = hutch_plus_plus(op, 30, seed=3)
    assert res.details["sketch_size"] == 10 and res.details["residual_probes"] == 10
    # oracle: rebuild the sketch and residual probes from the same generator
    gen = torch.Generator().manual_seed(3)
    be = SingleDeviceBackend()
    cpu = torch.device("cpu")
    S = be.random(80, num=10, generator=gen, dtype=DT, device=cpu, distribution="rademacher").T
    Q, _ = torch.linalg.qr(A @ S)
    G = be.random(80, num=10, generator=gen, dtype=DT, device=cpu, distribution="rademacher").T
    PG = G - Q @ (Q.T @ G)
    forms = torch.einsum("ij,ij->j", PG, A @ PG)
    low = float(torch.trace(Q.T @ A @ Q))
    assert res.details["low_rank_trace"] == pytest.approx(low, rel=1e-12)
    np.testing.assert_allclose(res.samples, forms.numpy(), rtol=1e-9, atol=1e-9)


def test_memory_options() -> None:
    eigs = outliers_and_bulk(200)
    truth = eigs.sum()
    _, op = spectral_op(eigs, seed=8)
    capped = hutch_plus_plus(op, 90, seed=1, max_sketch_size=12)
    assert capped.details["sketch_size"] == 12 and capped.details["residual_probes"] == 66
    assert capped.num_matvecs == 90
    batched = xtrace(op, 100, seed=1, max_sketch_size=20)
    assert batched.details["num_batches"] == 3 and batched.num_matvecs == 100
    assert batched.samples.size == 50
    res = [xtrace(op, 100, seed=s, max_sketch_size=20) for s in range(60)]
    assert np.mean([abs(r.estimate - truth) <= 3 * r.stderr for r in res]) >= 0.9
    for method in ("hutch++", "xtrace"):
        here = trace(op, 40, method=method, seed=5)
        on_cpu = trace(op, 40, method=method, seed=5, sketch_device="cpu")
        assert on_cpu.estimate == pytest.approx(here.estimate, rel=1e-12)


def test_probes_go_through_matmat_in_blocks() -> None:
    eigs = outliers_and_bulk(64)
    A, _ = spectral_op(eigs)
    count = {"matvec": 0, "matmat": 0, "columns": 0}

    def mv(v: torch.Tensor) -> torch.Tensor:
        count["matvec"] += 1
        return A @ v

    def mm(V: torch.Tensor) -> torch.Tensor:
        count["matmat"] += 1
        count["columns"] += V.shape[1]
        return A @ V

    op = LambdaOperator(mv, 64, dtype=DT, matmat_fn=mm)
    for method in METHODS:
        count.update(matvec=0, matmat=0, columns=0)
        res = trace(op, 60, method=method, seed=0, block_size=16)
        assert count["matvec"] == 0
        assert count["columns"] == res.num_matvecs == 60
        assert count["matmat"] <= 6


def test_seeds() -> None:
    _, op = spectral_op(outliers_and_bulk(100))
    for method in METHODS:
        a = trace(op, 30, method=method, seed=7)
        b = trace(op, 30, method=method, seed=7)
        assert a.estimate == b.estimate and a.seed == 7
        c = trace(op, 30, method=method)
        d = trace(op, 30, method=method)
        assert c.seed != d.seed and c.estimate != d.estimate
        again = trace(op, 30, method=method, seed=c.seed)
        assert again.estimate == c.estimate  # the recorded fresh seed reproduces


def test_bad_input() -> None:
    _, op = spectral_op(outliers_and_bulk(50))
    with pytest.raises(ValueError, match="Unknown trace method"):
        trace(op, 30, method="hutch+")
    with pytest.raises(ValueError, match="distribution"):
        trace(op, 30, distribution="uniform")
    with pytest.raises(ValueError, match=r"num_matvecs >= 4"):
        trace(op, 3, method="hutch++")
    with pytest.raises(ValueError, match=r"num_matvecs >= 4"):
        trace(op, 2, method="xtrace")
    with pytest.raises(ValueError, match=r"num_matvecs >= 2"):
        trace(op, 1, method="hutchinson")
    with pytest.raises(TypeError, match="num_matvecs"):
        trace(op, 30.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        trace(op, 30, seed="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_sketch_size"):
        trace(op, 30, max_sketch_size=1)
    with pytest.raises(ValueError, match="block_size"):
        trace(op, 30, block_size=0)
    with pytest.raises(TypeError, match="CurvatureOperator"):
        trace(torch.eye(3), 30)  # type: ignore[arg-type]
    nonsym = LambdaOperator(lambda v: v, 5, dtype=DT, symmetric=False)
    with pytest.raises(ValueError, match="symmetric"):
        trace(nonsym, 30)


def test_json_round_trip() -> None:
    _, op = spectral_op(outliers_and_bulk(50))
    for method in METHODS:
        res = trace(op, 30, method=method, seed=1)
        back = TraceResult.from_dict(json.loads(json.dumps(res.to_dict())))
        assert back.estimate == res.estimate and back.stderr == res.stderr
        assert back.method == method and back.seed == 1 and back.details == res.details
        np.testing.assert_array_equal(back.samples, res.samples)
        lo, hi = back.interval()
        assert lo <= back.estimate <= hi
    with pytest.raises(ValueError, match="TraceResult"):
        TraceResult.from_dict({"type": "DiagonalResult"})


def test_hessian_operator_trace_is_covered_by_its_error_bars() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    data = [(torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))) for _ in range(2)]

    def loss(m: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    H = dense_hessian(model, data, loss)
    truth = float(torch.trace(H))
    op = HessianOperator(model, data, loss)
    assert op.size == H.shape[0] == 43
    for method in METHODS:
        res = [trace(op, 16, method=method, seed=s) for s in range(20)]
        coverage = np.mean([abs(r.estimate - truth) <= 3 * r.stderr for r in res])
        assert coverage >= 0.9, (method, coverage)


def test_docstring_examples_run() -> None:
    for name in ("trace", "hutchinson", "hutch_plus_plus", "xtrace"):
        # (the package re-exports functions under the module names, so import by path)
        module = importlib.import_module(f"hessian_eigenthings.algorithms.{name}")
        failures, _ = doctest.testmod(module, extraglobs={"torch": torch}, verbose=False)
        assert failures == 0, module.__name__


def test_bfloat16_operator_gets_float32_probes() -> None:
    eigs = outliers_and_bulk(128)
    A, _ = spectral_op(eigs, seed=9)
    Ab = A.to(torch.bfloat16)
    seen: list[torch.dtype] = []

    def mm(V: torch.Tensor) -> torch.Tensor:
        seen.append(V.dtype)
        return Ab @ V

    op = LambdaOperator(lambda v: Ab @ v, 128, dtype=torch.bfloat16, matmat_fn=mm)
    for method in METHODS:
        res = trace(op, 60, method=method, seed=0)
        # bf16 products are only accurate to ~1%; the estimate is still close
        assert abs(res.estimate - eigs.sum()) <= 0.05 * eigs.sum()
    assert set(seen) == {torch.bfloat16}  # the operator computes in its own dtype


def test_float32_rank_deficient_sketch_falls_back_honestly() -> None:
    # A steep power law in float32: the sketch of 250 probes is numerically rank
    # deficient, and the leave-one-out estimates would ignore the tail. The fallback
    # (deflation + fresh residual probes) keeps the estimate accurate and covered.
    eigs = np.arange(1, 401, dtype=float) ** -2.0
    A, _ = spectral_op(eigs, seed=3)
    A32 = A.float()
    op = LambdaOperator(lambda v: A32 @ v, 400, dtype=torch.float32, matmat_fn=lambda V: A32 @ V)
    res = [xtrace(op, 500, seed=s) for s in range(20)]
    assert all(r.details["sketch_rank"] < 250 for r in res)
    assert all(r.num_matvecs == 500 for r in res)
    err = np.array([abs(r.estimate - eigs.sum()) for r in res])
    assert np.mean(err <= 3 * np.array([r.stderr for r in res])) >= 0.9
    assert err.mean() <= 1e-4 * eigs.sum()


def test_no_docstring_repeats_a_section() -> None:
    """Each Google section (Args, Returns, Raises, ...) appears at most once per docstring.

    ``trace`` once had two ``Raises:`` sections, which the rendered API page shows as two
    lists (the first hiding the second in some viewers).
    """
    import ast
    from pathlib import Path

    import hessian_eigenthings

    sections = ("Args:", "Returns:", "Raises:", "Yields:", "Attributes:", "Example:")
    repeated = []
    for path in Path(hessian_eigenthings.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = [ln.strip() for ln in (ast.get_docstring(node) or "").splitlines()]
                repeated += [f"{path.name}:{node.name} {s}" for s in sections if lines.count(s) > 1]
    assert repeated == []

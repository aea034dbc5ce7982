"""Stochastic Lanczos Quadrature on known spectra, over several seeds.

Properties: the density integrates to 1, the quadrature measure is within 2% of the
spectral range of the true eigenvalue distribution in Wasserstein-1 distance (scipy),
each cluster carries the right mass, re-smoothing costs no matvecs, the log scale
(zeros and signs), trace / log-det estimates with honest error bars, breakdown, seeds,
bad input, JSON, plots, and a real HessianOperator against its dense eigenvalues.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t
from scipy.stats import wasserstein_distance
from torch import nn

from hessian_eigenthings import HessianOperator, LambdaOperator
from hessian_eigenthings.algorithms.estimator_results import SpectralDensityResult
from hessian_eigenthings.algorithms.spectral_density import spectral_density
from tests.helpers import dense_hessian

DT = torch.float64
SEEDS = range(6)


def block_op(eigs: np.ndarray, block: int = 100, seed: int = 0) -> LambdaOperator:
    """Known spectrum, fast matvec: eigenvalues shuffled into dense random-orthogonal blocks.

    Every eigenvector is dense within its block of 100 coordinates, so probe statistics
    are those of a generic basis while a matvec costs O(n * block).
    """
    rng = np.random.default_rng(seed)
    n = len(eigs)
    nb = n // block
    e = torch.as_tensor(rng.permutation(eigs).reshape(nb, block), dtype=DT)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(nb, block, block, generator=g, dtype=DT))
    B = (Q * e[:, None, :]) @ Q.transpose(1, 2)
    B = 0.5 * (B + B.transpose(1, 2))

    def mv(v: torch.Tensor) -> torch.Tensor:
        return torch.bmm(B, v.view(nb, block, 1)).reshape(n)

    def mm(V: torch.Tensor) -> torch.Tensor:
        return torch.bmm(B, V.reshape(nb, block, -1)).reshape(n, -1)

    op = LambdaOperator(mv, n, dtype=DT, matmat_fn=mm)
    op.calls = {"n": 0}  # type: ignore[attr-defined]

    def counted(v: torch.Tensor) -> torch.Tensor:
        op.calls["n"] += 1  # type: ignore[attr-defined]
        return mv(v)

    op._fn = counted
    return op


def bimodal(n: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(-1.0, 0.1, n // 2), rng.normal(3.0, 0.3, n // 2)])


def outliers_and_bulk(n: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.concatenate([[50.0, 30.0, 20.0, 15.0, 10.0], rng.uniform(0.0, 1.0, n - 5)])


def quadrature(res: SpectralDensityResult) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate(res.nodes), np.concatenate(res.weights) / res.num_runs


def w1_fraction(eigs: np.ndarray, res: SpectralDensityResult) -> float:
    x, w = quadrature(res)
    return wasserstein_distance(eigs, x, None, w) / float(eigs.max() - eigs.min())


@pytest.fixture(scope="module")
def bimodal_runs() -> tuple[np.ndarray, list[SpectralDensityResult]]:
    eigs = bimodal()
    op = block_op(eigs)
    return eigs, [spectral_density(op, 10, 60, seed=s) for s in SEEDS]


def test_bimodal_density_integral_distance_and_cluster_masses(
    bimodal_runs: tuple[np.ndarray, list[SpectralDensityResult]],
) -> None:
    eigs, runs = bimodal_runs
    dists = []
    for res in runs:
        assert res.integral() == pytest.approx(1.0, abs=0.01)
        assert all(abs(w.sum() - 1.0) < 1e-12 for w in res.weights)
        dists.append(w1_fraction(eigs, res))
        x, w = quadrature(res)
        assert w[x < 1.0].sum() == pytest.approx(0.5, abs=0.04)
        # the smoothed density carries the same mass on each side of the gap
        left = res.grid < 1.0
        left_mass = float(np.sum(res.density[left]) * (res.grid[1] - res.grid[0]))
        assert left_mass == pytest.approx(0.5, abs=0.04)
        assert res.num_matvecs == 600
    print(f"\nbimodal W1 / range over {len(runs)} seeds: " + ", ".join(f"{d:.4f}" for d in dists))
    assert max(dists) <= 0.02


def test_outliers_and_bulk() -> None:
    eigs = outliers_and_bulk()
    op = block_op(eigs, seed=3)
    dists = []
    for s in SEEDS:
        res = spectral_density(op, 10, 60, seed=s)
        assert res.integral() == pytest.approx(1.0, abs=0.01)
        dists.append(w1_fraction(eigs, res))
        x, w = quadrature(res)
        assert w[x <= 1.0 + 1e-6].sum() == pytest.approx(0.995, abs=0.01)
        for outlier in (50.0, 30.0, 20.0, 15.0, 10.0):
            # every run resolves every outlier (extreme Ritz values converge first)
            assert all(np.min(np.abs(n - outlier)) < 1e-6 * outlier for n in res.nodes)
    print("\noutliers+bulk W1 / range: " + ", ".join(f"{d:.5f}" for d in dists))
    assert max(dists) <= 0.02


def test_trace_and_logdet_from_the_quadrature(
    bimodal_runs: tuple[np.ndarray, list[SpectralDensityResult]],
) -> None:
    _, runs = bimodal_runs
    for res in runs:
        same = res.estimate_trace_of(lambda t: t)
        assert same.estimate == pytest.approx(res.trace.estimate, rel=1e-12)
        assert res.trace.method == "slq" and res.trace.samples.size == 10
    # coverage of tr(A) and log det(A) over seeds on an SPD spectrum
    spd = np.random.default_rng(5).uniform(1.0, 10.0, 500)
    op = block_op(spd, seed=6)
    inside_tr, inside_ld = [], []
    for s in range(30):
        res = spectral_density(op, 8, 25, seed=s)
        inside_tr.append(abs(res.trace.estimate - spd.sum()) <= 3 * res.trace.stderr)
        ld = res.estimate_trace_of(np.log)
        inside_ld.append(abs(ld.estimate - np.log(spd).sum()) <= 3 * ld.stderr)
    assert np.mean(inside_tr) >= 0.9 and np.mean(inside_ld) >= 0.9


def test_resmooth_costs_no_matvecs() -> None:
    eigs = bimodal(500)
    op = block_op(eigs, seed=2)
    res = spectral_density(op, 5, 40, seed=0)
    calls = op.calls["n"]  # type: ignore[attr-defined]
    assert calls == res.num_matvecs == 200
    wide = res.resmooth(sigma=0.2)
    grid = np.linspace(-3.0, 6.0, 2001)
    on_grid = res.resmooth(grid=grid)
    log = res.resmooth(scale="log")
    assert op.calls["n"] == calls  # type: ignore[attr-defined]
    assert wide.sigma == 0.2 and wide.integral() == pytest.approx(1.0, abs=0.01)
    np.testing.assert_array_equal(on_grid.grid, grid)
    assert on_grid.sigma == res.sigma and on_grid.integral() == pytest.approx(1.0, abs=0.01)
    again = res.resmooth()
    np.testing.assert_array_equal(again.density, res.density)
    assert log.scale == "log"
    for n1, n2 in zip(wide.nodes, res.nodes):
        np.testing.assert_array_equal(n1, n2)


def test_log_scale_zero_mass_on_a_psd_spectrum_with_a_null_space() -> None:
    # GGN/Fisher-like: a null space at the lower edge of the spectrum, which Lanczos resolves
    rng = np.random.default_rng(7)
    eigs = np.concatenate([np.zeros(300), 10.0 ** rng.uniform(0.0, 1.0, 700)])
    op = block_op(eigs, seed=3)
    for s in range(3):
        res = spectral_density(op, 10, 40, scale="log", seed=s)
        assert res.zero_mass == pytest.approx(0.3, abs=0.05)
        assert res.integral() == pytest.approx(1.0 - res.zero_mass, abs=0.01)
        assert res.negative_mass == 0.0
        assert res.negative_density is not None and not res.negative_density.any()
        x, w = quadrature(res)
        assert w[x > 10.0**0.5].sum() == pytest.approx(np.mean(eigs > 10.0**0.5), abs=0.05)


def test_log_scale_with_signs_and_many_magnitudes() -> None:
    rng = np.random.default_rng(7)
    eigs = np.concatenate(
        [np.zeros(200), 10.0 ** rng.uniform(0.0, 2.0, 600), -(10.0 ** rng.uniform(0.0, 1.0, 200))]
    )
    op = block_op(eigs, seed=3)
    res = spectral_density(op, 10, 80, scale="log", seed=1)
    assert res.scale == "log" and res.negative_density is not None
    x, w = quadrature(res)
    # an interior zero cluster is resolved to about span / m by 80 steps: the nodes within
    # zero_tol of 0 (the zeros and the eigenvalues nearest to them) are dropped as zero mass
    assert res.zero_mass == pytest.approx(float(w[np.abs(x) <= res.zero_tol].sum()))
    assert res.integral() == pytest.approx(1.0 - res.zero_mass, abs=0.01)
    step = res.grid[1] - res.grid[0]
    assert float(np.sum(res.negative_density) * step) == pytest.approx(res.negative_mass, abs=0.01)
    assert res.negative_mass == pytest.approx(float(w[x < -res.zero_tol].sum()))
    # the large eigenvalues are resolved on the log axis: the mass above 10 is right
    assert w[x > 10.0].sum() == pytest.approx(np.mean(eigs > 10.0), abs=0.03)
    # and the quadrature is close to the truth in W1 on the linear axis
    assert w1_fraction(eigs, res) <= 0.02
    # same seed on the linear scale, re-smoothed onto the log scale: identical
    lin = spectral_density(op, 10, 80, seed=1)
    np.testing.assert_allclose(lin.resmooth(scale="log").density, res.density)


def test_breakdown_runs_are_short_and_exact() -> None:
    eigs = np.repeat([1.0, 4.0, 9.0], [300, 500, 200])
    op = block_op(eigs, seed=9)
    res = spectral_density(op, 4, 60, seed=0)
    assert all(n.size == 3 for n in res.nodes)
    assert res.num_matvecs <= 4 * 8
    x, w = quadrature(res)
    for value, frac in [(1.0, 0.3), (4.0, 0.5), (9.0, 0.2)]:
        assert np.all(np.min(np.abs(x[:, None] - [1.0, 4.0, 9.0]), axis=1) < 1e-9)
        assert w[np.abs(x - value) < 1e-6].sum() == pytest.approx(frac, abs=0.1)
    assert res.integral() == pytest.approx(1.0, abs=0.01)


def test_without_reorthogonalization_the_measure_stays_accurate() -> None:
    # O(n)-memory Lanczos: ghosts share their eigenvalue's weight, W1 stays small
    eigs = outliers_and_bulk()
    op = block_op(eigs, seed=3)
    for s in range(3):
        res = spectral_density(op, 10, 60, reorthogonalize=False, seed=s)
        assert res.integral() == pytest.approx(1.0, abs=0.01)
        assert w1_fraction(eigs, res) <= 0.02
        x, w = quadrature(res)
        assert w[x <= 1.0 + 1e-6].sum() == pytest.approx(0.995, abs=0.01)


def test_gaussian_probes() -> None:
    eigs = bimodal()
    op = block_op(eigs, seed=4)
    res = spectral_density(op, 10, 60, distribution="gaussian", seed=2)
    assert res.integral() == pytest.approx(1.0, abs=0.01)
    assert w1_fraction(eigs, res) <= 0.02
    assert not np.allclose(res.probe_norms_sq, 1000.0)


def test_seeds() -> None:
    op = block_op(bimodal(200), seed=1)
    a = spectral_density(op, 3, 10, seed=4)
    b = spectral_density(op, 3, 10, seed=4)
    np.testing.assert_array_equal(a.density, b.density)
    c, d = spectral_density(op, 3, 10), spectral_density(op, 3, 10)
    assert c.seed != d.seed and not np.array_equal(c.nodes[0], d.nodes[0])
    np.testing.assert_array_equal(spectral_density(op, 3, 10, seed=c.seed).density, c.density)


def test_bad_input() -> None:
    op = block_op(bimodal(200), seed=1)
    with pytest.raises(ValueError, match="scale"):
        spectral_density(op, 2, 5, scale="loglog")
    with pytest.raises(ValueError, match="num_runs"):
        spectral_density(op, 0, 5)
    with pytest.raises(ValueError, match="lanczos_steps"):
        spectral_density(op, 2, 0)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(op, 2, 5, sigma=-1.0)
    with pytest.raises(ValueError, match="grid"):
        spectral_density(op, 2, 5, grid=[0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="distribution"):
        spectral_density(op, 2, 5, distribution="uniform")
    with pytest.raises(ValueError, match="zero_tol"):
        spectral_density(op, 2, 5, zero_tol=-1.0)
    with pytest.raises(TypeError, match="CurvatureOperator"):
        spectral_density(np.eye(3), 2, 5)  # type: ignore[arg-type]
    res = spectral_density(op, 2, 5, seed=0)
    with pytest.raises(ValueError, match="scale"):
        res.resmooth(scale="ln")
    with pytest.warns(UserWarning, match="spacing"):
        res.resmooth(sigma=res.sigma / 100)


def test_json_round_trip() -> None:
    op = block_op(bimodal(200), seed=1)
    for scale in ("linear", "log"):
        res = spectral_density(op, 3, 12, scale=scale, seed=5)
        back = SpectralDensityResult.from_dict(json.loads(json.dumps(res.to_dict())))
        np.testing.assert_array_equal(back.density, res.density)
        np.testing.assert_array_equal(back.grid, res.grid)
        for n1, n2 in zip(back.nodes, res.nodes):
            np.testing.assert_array_equal(n1, n2)
        assert back.trace.estimate == res.trace.estimate and back.seed == 5
        np.testing.assert_allclose(
            back.resmooth(sigma=0.3).density, res.resmooth(sigma=0.3).density
        )


def test_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hessian_eigenthings.plotting import plot_eigenvalues

    op = block_op(bimodal(200), seed=1)  # has negative eigenvalues
    res = spectral_density(op, 3, 12, seed=5)
    ax = res.plot(mark_eigenvalues=[3.0, -1.0])
    assert len(ax.lines) == 3 and ax.get_yscale() == "log"
    ax = res.plot(scale="log", yscale="linear")
    assert ax.get_xlabel().startswith("log10") and len(ax.lines) == 2  # +/- parts
    ax = plot_eigenvalues(torch.tensor([3.0, 2.0, 1.0]), errors=[0.1, 0.1, 0.2])
    assert ax.get_xlabel() == "index"
    with pytest.raises(ValueError, match="errors"):
        plot_eigenvalues([1.0, 2.0], errors=[0.1])
    plt.close("all")
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"hessian-eigenthings\[plot\]"):
        res.plot()


def test_hessian_operator_density_matches_dense_eigenvalues() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    data = [(torch.randn(32, 6, dtype=DT), torch.randint(0, 3, (32,)))]

    def loss(m: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    eigs = torch.linalg.eigvalsh(dense_hessian(model, data, loss)).numpy()
    op = HessianOperator(model, data, loss)
    res = spectral_density(op, 10, 30, seed=0)
    assert res.integral() == pytest.approx(1.0, abs=0.01)
    x, _ = quadrature(res)
    span = eigs.max() - eigs.min()
    assert x.min() >= eigs.min() - 1e-8 * span and x.max() <= eigs.max() + 1e-8 * span
    assert all(abs(n.max() - eigs.max()) <= 1e-8 * span for n in res.nodes)
    assert w1_fraction(eigs, res) <= 0.02
    assert abs(res.trace.estimate - eigs.sum()) <= 4 * res.trace.stderr


def test_docstring_example_runs() -> None:
    import doctest
    import importlib

    module = importlib.import_module("hessian_eigenthings.algorithms.spectral_density")
    failures, attempted = doctest.testmod(module, extraglobs={"torch": torch})
    assert failures == 0 and attempted > 0


# -- masses: negative, zero and positive fractions with error bars ---------------------


def signed_spectrum(n: int = 1000, neg: float = 0.2, zero: float = 0.5) -> np.ndarray:
    """Negative eigenvalues in [-2, -0.5], exact zeros, positive ones in [1, 10]."""
    rng = np.random.default_rng(11)
    n_neg, n_zero = int(neg * n), int(zero * n)
    return np.concatenate(
        [
            -rng.uniform(0.5, 2.0, n_neg),
            np.zeros(n_zero),
            rng.uniform(1.0, 10.0, n - n_neg - n_zero),
        ]
    )


def dense_op(eigs: np.ndarray, dtype: torch.dtype, seed: int = 0) -> LambdaOperator:
    """``Q diag(eigs) Q^T`` with a Haar-random ``Q``, rounded to ``dtype`` (exact zeros of
    the float64 matrix become eigenvalues of order ``eps * ||A||`` of either sign)."""
    n = eigs.size
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    a = (q * torch.as_tensor(eigs, dtype=DT)) @ q.T
    a = ((a + a.T) / 2).to(dtype)
    return LambdaOperator(lambda v: a @ v, n, dtype=dtype)


def masses(res: SpectralDensityResult) -> np.ndarray:
    return np.array([res.negative_mass, res.zero_mass, res.positive_mass])


def mass_errors(res: SpectralDensityResult) -> np.ndarray:
    return np.array([res.negative_mass_stderr, res.zero_mass_stderr, res.positive_mass_stderr])


def check_masses(res: SpectralDensityResult, truth: np.ndarray) -> None:
    """Masses sum to 1, match the quadrature, and are within their error bars of the truth.

    The standard errors are estimated from ``R`` runs, so ``(mass - truth) / stderr`` follows
    Student's t with ``R - 1`` degrees of freedom: the bound is its two-sided 1e-4 quantile
    (each check fails with probability 1e-4 when the error bars are honest). Calibration
    itself is checked over many seeds in ``test_mass_error_bars_cover_the_truth_over_seeds``.
    """
    got, err = masses(res), mass_errors(res)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    x, w = quadrature(res)
    t = res.zero_tol
    np.testing.assert_allclose(got, [w[x < -t].sum(), w[np.abs(x) <= t].sum(), w[x > t].sum()])
    assert np.all(np.isfinite(err)) and np.all(err >= 0)
    z = student_t.ppf(1 - 0.5e-4, res.num_runs - 1)
    assert np.all(np.abs(got - truth) <= z * err), (got, err, truth)


@pytest.mark.parametrize("scale", ["linear", "log"])
def test_masses_of_a_spectrum_with_negative_zero_and_positive_parts(scale: str) -> None:
    # 20% negative, 50% exactly zero, 30% positive; zero lies inside the spectrum
    eigs = signed_spectrum()
    truth = np.array([0.2, 0.5, 0.3])
    op = block_op(eigs, seed=5)
    for s in range(3):
        res = spectral_density(op, 10, 80, scale=scale, seed=s)
        check_masses(res, truth)
        assert np.all(np.abs(masses(res) - truth) <= 0.05)
        # the threshold is the resolution of the run at 0, far below the gaps around 0
        assert 1e-3 < res.zero_tol < 0.5
        if scale == "log":
            assert res.integral() == pytest.approx(1.0 - res.zero_mass, abs=0.01)
        else:
            assert res.integral() == pytest.approx(1.0, abs=0.01)
    # the masses do not depend on the scale of the density
    other = "log" if scale == "linear" else "linear"
    np.testing.assert_array_equal(masses(res.resmooth(scale=other)), masses(res))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masses_with_exact_zeros_rounded_by_the_operator(dtype: torch.dtype) -> None:
    # the zero eigenvalues of a float32 operator are rounding noise of either sign
    eigs = signed_spectrum(n=600)
    op = dense_op(eigs, dtype)
    for scale in ("linear", "log"):
        res = spectral_density(op, 8, 60, scale=scale, seed=1)
        check_masses(res, np.array([0.2, 0.5, 0.3]))
        x, _ = quadrature(res)
        assert np.any((x < 0) & (np.abs(x) <= res.zero_tol)) or dtype == torch.float64


def test_masses_of_a_large_zero_cluster() -> None:
    # 90% exact zeros with 4% negative and 6% positive eigenvalues
    eigs = signed_spectrum(neg=0.04, zero=0.9)
    op = block_op(eigs, seed=6)
    for s in range(3):
        res = spectral_density(op, 10, 50, seed=s)
        check_masses(res, np.array([0.04, 0.9, 0.06]))


def test_tiny_negative_eigenvalues_below_the_resolution_count_as_zero() -> None:
    # A GGN-like spectrum: a null space, 10% tiny negative eigenvalues (-1e-9 * ||A||, as
    # rounding leaves them) and a positive part. At 40 steps they are zero; what is
    # resolved (the positive part) keeps its mass, on both scales.
    rng = np.random.default_rng(12)
    eigs = np.concatenate([np.zeros(500), np.full(100, -1e-8), 10.0 ** rng.uniform(-1.0, 1.0, 400)])
    op = block_op(eigs, seed=7)
    for scale in ("linear", "log"):
        for s in range(2):
            res = spectral_density(op, 10, 40, scale=scale, seed=s)
            assert res.zero_tol > 1e-8
            assert res.negative_mass == 0.0
            check_masses(res, np.array([0.0, 0.6, 0.4]))
    # An explicit zero_tol is honoured and recorded. (Below the resolution the zeros and
    # the tiny negatives share one node, at about +2e-8 here: such a threshold cannot
    # split them, which is why the default is the resolution; see the docs.)
    fine = spectral_density(op, 10, 40, seed=0, zero_tol=1e-12)
    assert fine.zero_tol == 1e-12 and masses(fine).sum() == pytest.approx(1.0)


def test_mass_error_bars_cover_the_truth_over_seeds() -> None:
    eigs = signed_spectrum(n=500)
    op = block_op(eigs, seed=8)
    truth = np.array([0.2, 0.5, 0.3])
    got, err = [], []
    for s in range(30):
        res = spectral_density(op, 6, 40, seed=s)
        got.append(masses(res))
        err.append(mass_errors(res))
    g, e = np.array(got), np.array(err)
    coverage = np.mean(np.abs(g - truth) <= 3 * e, axis=0)
    ratio = e.mean(axis=0) / g.std(axis=0, ddof=1)
    print(f"\nmass 3-se coverage over 30 seeds {coverage}, stderr / spread {ratio}")
    assert np.all(coverage >= 0.85) and np.all((ratio >= 0.5) & (ratio <= 2.0))
    assert np.all(np.abs(g.mean(axis=0) - truth) <= 3 * g.std(axis=0, ddof=1) / np.sqrt(30))


def test_default_zero_tol_is_the_resolution_at_zero_or_the_precision_floor() -> None:
    from hessian_eigenthings.algorithms.spectral_density import default_zero_tol

    m = 80
    # 0 inside the spectrum [-2, 10]: the Chebyshev spacing there, ~ pi sqrt(2 * 10) / m
    inside = default_zero_tol([np.array([-2.0, 10.0])], m, torch.float64)
    assert inside == pytest.approx(np.pi * np.sqrt(20.0) / m, rel=0.05)
    # 0 at the lower end of a PSD spectrum: ~ span * pi^2 / (2 m^2), much finer
    edge = default_zero_tol([np.array([0.0, 10.0])], m, torch.float64)
    assert edge == pytest.approx(10.0 * np.pi**2 / (2 * m**2), rel=0.05)
    # at 0 the precision of the operator's dtype is the floor
    many = default_zero_tol([np.array([0.0, 10.0])], 10**5, torch.float32)
    assert many == pytest.approx(4 * torch.finfo(torch.float32).eps * 10.0)
    bf16 = default_zero_tol([np.array([0.0, 10.0])], m, torch.bfloat16)
    assert bf16 == pytest.approx(4 * 2.0**-7 * 10.0)


def test_masses_of_a_small_cnn_hessian_match_its_dense_eigenvalues() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)).to(DT)
    data = [(torch.randn(64, 1, 6, 6, dtype=DT), torch.randint(0, 4, (64,)))]

    def loss(m: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):  # partly trained: an indefinite Hessian with a large null space
        opt.zero_grad()
        loss(model, data[0]).backward()
        opt.step()
    eigs = torch.linalg.eigvalsh(dense_hessian(model, data, loss)).numpy()
    op = HessianOperator(model, data, loss)
    for scale in ("linear", "log"):
        res = spectral_density(op, 10, 60, scale=scale, seed=0)
        t = res.zero_tol
        # The masses are those of the dense eigenvalues at the run's resolution: the
        # boundary +-t is known to within a factor 2 (nodes near it carry mass from both
        # sides), and the error bars cover the probe randomness.
        lo = np.array([np.mean(eigs < -2 * t), np.mean(abs(eigs) <= t / 2), np.mean(eigs > 2 * t)])
        hi = np.array([np.mean(eigs < -t / 2), np.mean(abs(eigs) <= 2 * t), np.mean(eigs > t / 2)])
        got, err = masses(res), mass_errors(res)
        assert np.all(got >= lo - 3 * err) and np.all(got <= hi + 3 * err), (got, err, lo, hi)
        assert (eigs < 0).mean() > 0.2 > res.negative_mass  # tiny negatives are not negative


def test_masses_round_trip_and_old_payloads_get_them_recomputed() -> None:
    op = block_op(signed_spectrum(n=300), seed=9)
    res = spectral_density(op, 4, 30, seed=2)
    back = SpectralDensityResult.from_dict(json.loads(json.dumps(res.to_dict())))
    np.testing.assert_array_equal(masses(back), masses(res))
    np.testing.assert_array_equal(mass_errors(back), mass_errors(res))
    # A payload written before the masses had error bars: no positive mass, no stderrs,
    # the zero mass of that version (0 on the linear scale). Masses follow its zero_tol.
    old = {k: v for k, v in res.to_dict().items() if not k.endswith("mass_stderr")}
    del old["positive_mass"]
    old.update(zero_mass=0.0, negative_mass=0.7)
    loaded = SpectralDensityResult.from_dict(old)
    np.testing.assert_allclose(masses(loaded), masses(res))
    np.testing.assert_allclose(mass_errors(loaded), mass_errors(res))
    assert "masses (negative, zero, positive)" in repr(loaded)
    one = spectral_density(op, 1, 30, seed=2)
    assert np.isnan(one.negative_mass_stderr) and masses(one).sum() == pytest.approx(1.0)

"""The peer benchmark's own logic: problems, dense ground truth, metrics, task runner, report.

Needs none of the peers (curvlinops, PyHessian, the original release): those are measured
by ``benchmarks/compare_peers.py`` only. Every oracle here is independent of the code under
test: ``torch.autograd.functional.hessian`` for the dense Hessian, the exact identity GGN =
Hessian for a model linear in its parameters, ``scipy.stats.wasserstein_distance`` and closed
forms for the Wasserstein-1 distance.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

P = importlib.import_module("problems")
C = importlib.import_module("compare_peers")
common = importlib.import_module("peers.common")


def tiny_problem(ragged: bool = True, layernorm: bool = True) -> P.Problem:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 3)]
    if layernorm:
        layers += [nn.LayerNorm(3)]
    layers += [nn.Tanh(), nn.Linear(3, 3)]
    model = nn.Sequential(*layers).double()
    x = torch.randn(11, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    sizes = (8, 3) if ragged else (11,)
    batches = list(zip(torch.split(x, sizes), torch.split(y, sizes)))
    return P.Problem("tiny", model, batches, nn.CrossEntropyLoss(), "tiny", {})


def flat_loss_fn(problem: P.Problem):
    """The problem's loss as a function of one flat parameter vector (all data at once)."""
    names = [n for n, p in problem.model.named_parameters()]
    shapes = [p.shape for p in problem.params]
    sizes = [p.numel() for p in problem.params]
    x = torch.cat([b[0] for b in problem.batches])
    y = torch.cat([b[1] for b in problem.batches])

    def f(theta: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        out = torch.func.functional_call(problem.model, params, (x,))
        return nn.functional.cross_entropy(out, y)  # mean over all samples

    return f


# --------------------------------------------------------------------------- problems


def test_mlp_problem_is_deterministic_and_real_data():
    a = P.build("mlp_digits", smoke=True)
    b = P.build("mlp_digits", smoke=True)
    assert torch.equal(P.flat_params(a), P.flat_params(b))
    assert all(
        torch.equal(xa, xb) and torch.equal(ya, yb)
        for (xa, ya), (xb, yb) in zip(a.batches, b.batches)
    )
    assert any(isinstance(m, nn.LayerNorm) for m in a.model.modules())
    x = torch.cat([bx for bx, _ in a.batches])
    y = torch.cat([by for _, by in a.batches])
    assert x.shape == (512, 64) and x.dtype == torch.float64
    assert set(y.tolist()) == set(range(10))  # the ten digit classes
    # trained a little: better than chance (log 10 = 2.30)
    assert float(a.mean_loss().detach()) < 1.0


def test_ragged_problem_has_short_last_batch_and_sample_weights():
    pr = P.build("mlp_digits_ragged", smoke=True)
    sizes = [len(b[1]) for b in pr.batches]
    assert sizes[-1] < sizes[0]
    assert pr.total_weight == sum(sizes)


def test_cnn_problem_shapes():
    pr = P.build("cnn_digits", smoke=True, dtype=torch.float32)
    x, y = pr.batches[0]
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert pr.model(x).shape == (len(y), 10)


def test_gpt2_problem_pads_and_ignores_labels():
    pytest.importorskip("transformers")
    pr = P.build("gpt2_tiny", smoke=True)
    ((x, y),) = pr.batches
    ids, mask = x[:, 0], x[:, 1]
    expected = torch.where(mask.bool(), ids, torch.full_like(ids, -100))[:, 1:].reshape(-1)
    assert torch.equal(y, expected)
    assert (y == -100).any() and (mask == 0).any()  # some sequences are padded
    assert pr.model(x).shape == (y.numel(), pr.config["vocab"])
    assert pr.batch_weight(pr.batches[0]) == int((y != -100).sum())


def test_unknown_problem_raises():
    with pytest.raises(ValueError, match="Unknown problem"):
        P.build("resnet", smoke=True)


# --------------------------------------------------------------------------- ground truth


def test_dense_hessian_matches_autograd_functional_on_ragged_batches():
    pr = tiny_problem(ragged=True)
    theta = P.flat_params(pr).clone()
    expected = torch.autograd.functional.hessian(flat_loss_fn(pr), theta)
    got = P.dense_hessian(pr)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, got.T, rtol=0, atol=0)


def test_dense_ggn_equals_hessian_for_model_linear_in_parameters():
    # For f(x) = W x + b, the Jacobian does not depend on the parameters, so the second-order
    # term of the Hessian vanishes and G == H exactly.
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    pr = P.Problem("lin", model, batches, nn.CrossEntropyLoss(), "lin", {})
    torch.testing.assert_close(P.dense_ggn(pr), P.dense_hessian(pr), rtol=1e-10, atol=1e-12)


def test_dense_ggn_is_psd_and_differs_from_hessian_for_nonlinear_model():
    pr = tiny_problem()
    ggn = P.dense_ggn(pr)
    evals = torch.linalg.eigvalsh(ggn)
    assert evals.min() > -1e-12 * evals.max()
    assert (ggn - P.dense_hessian(pr)).norm() > 1e-3 * ggn.norm()


def test_fd_hvp_matches_dense_and_restores_parameters():
    pr = tiny_problem()
    before = P.flat_params(pr).clone()
    hess = P.dense_hessian(pr)
    for seed in range(3):
        v = P.probe_vector(pr, seed=seed)
        hv = P.fd_hvp(pr, v)
        assert float((hv - hess @ v).norm() / (hess @ v).norm()) < 1e-8
    assert torch.equal(P.flat_params(pr), before)


# --------------------------------------------------------------------------- metrics


def test_wasserstein1_closed_forms():
    assert C.wasserstein1([0.0], [1.0], [2.5], [1.0]) == pytest.approx(2.5)
    assert C.wasserstein1([0.0, 1.0], [1.0, 1.0], [0.5], [1.0]) == pytest.approx(0.5)
    # weights are normalised: mass scale does not matter
    assert C.wasserstein1([0.0, 1.0], [3.0, 3.0], [0.5], [7.0]) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=20), rng.random(20)
    assert C.wasserstein1(x, w, x + 0.3, w) == pytest.approx(0.3)
    assert C.wasserstein1(x, w, x, w) == pytest.approx(0.0, abs=1e-15)


def test_wasserstein1_matches_scipy_on_random_measures():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(20):
        xa, xb = rng.normal(size=15), rng.normal(1.0, 2.0, size=9)
        wa, wb = rng.random(15), rng.random(9)
        expected = stats.wasserstein_distance(xa, xb, wa, wb)
        assert C.wasserstein1(xa, wa, xb, wb) == pytest.approx(expected, rel=1e-12)


def test_measure_of_quadrature_and_grid():
    xs, ws = C.measure_of({"nodes": [[0.0, 1.0], [2.0]], "weights": [[1.0, 3.0], [5.0]]})
    np.testing.assert_allclose(xs, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(ws, [0.125, 0.375, 0.5])  # runs normalised, then averaged
    grid = np.linspace(-1, 1, 201)
    dens = np.exp(-(grid**2) / 0.02)
    gx, gw = C.measure_of({"grid": grid.tolist(), "density": dens.tolist()})
    # a density symmetric about 0 is at W1 ~ its mean absolute deviation from a point mass
    w1 = C.wasserstein1(gx, gw, [0.0], [1.0])
    assert w1 == pytest.approx(np.sqrt(0.01) * np.sqrt(2 / np.pi), rel=1e-2)


def test_eig_and_trace_errors():
    truth = np.array([-3.0, 2.0, 1.0, 0.5])
    np.testing.assert_array_equal(C.top_k_by_magnitude(truth, 2), [-3.0, 2.0])
    want = C.top_k_by_magnitude(truth, 2)
    assert C.eig_error([2.0, -3.0], want) == 0.0
    assert C.eig_error([-3.0, 2.2], want) == pytest.approx(0.1)
    assert C.eig_error([-3.0], want) == float("inf")  # short result
    err = C.trace_error([9.0, 11.0, 13.0], 10.0)
    assert err["rel_bias"] == pytest.approx(0.1)
    assert err["rel_rmse"] == pytest.approx(np.sqrt((1 + 1 + 9) / 3) / 10)


# --------------------------------------------------------------------------- task runner


def fake_adapter(fail: str | None = None) -> types.SimpleNamespace:
    """An adapter whose 'Hessian' is the dense one of the problem."""

    def hessian_matvec(problem):
        hess = P.dense_hessian(problem)
        return lambda v: hess.to(v.dtype) @ v

    def ggn_matvec(problem):
        raise common.Unsupported("no GGN here")

    def top_eigs(problem, k, tol, seed):
        raise RuntimeError("solver exploded")

    return types.SimpleNamespace(
        hessian_matvec=hessian_matvec, ggn_matvec=ggn_matvec, top_eigs=top_eigs
    )


def test_run_tasks_reports_ok_na_and_errors():
    pr = tiny_problem()
    v = P.probe_vector(pr)
    tasks = [
        {"kind": "hvp", "op": "hessian", "v": v.tolist()},
        {"kind": "hvp", "op": "ggn", "v": v.tolist()},
        {"kind": "eig", "k": 2, "tol": 1e-6, "seed": 0},
        {"kind": "time", "op": "hessian", "repeats": 3},
    ]
    res = common.run_tasks(fake_adapter(), pr, tasks)
    assert res[0]["status"] == "ok"
    np.testing.assert_allclose(res[0]["hv"], (P.dense_hessian(pr) @ v).numpy(), rtol=1e-12)
    assert res[1] == {**res[1], "status": "n/a", "reason": "no GGN here"}
    assert res[2]["status"] == "error" and "solver exploded" in res[2]["error"]
    assert res[3]["status"] == "ok" and res[3]["repeats"] == 3
    assert res[3]["ratio"] == pytest.approx(res[3]["seconds"] / res[3]["baseline_seconds"])


def test_matvec_counter_counts_columns():
    counter = common.MatvecCounter()
    f = counter.wrap_vec(lambda v: v)
    f(torch.zeros(5))
    f(torch.zeros(5, 3))
    g = counter.wrap_list(lambda vs: vs)
    g([torch.zeros(2, 4), torch.zeros(3, 4)])
    assert counter.count == 1 + 3 + 4


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_rss_sees_torch_allocations_in_forked_child():
    def allocate():
        t = torch.ones(16 * 1024 * 1024, dtype=torch.float32)  # 64 MiB
        return float(t.sum())

    delta = common.peak_rss_delta_mib(allocate)
    assert 60.0 < delta < 200.0
    assert common.peak_rss_delta_mib(lambda: None) < 8.0

    def boom():
        raise ValueError("bad")

    with pytest.raises(RuntimeError, match="bad"):
        common.peak_rss_delta_mib(boom)


# --------------------------------------------------------------------------- report


def test_render_markdown_from_partial_results():
    task_ok = {"kind": "hvp", "op": "hessian", "status": "ok", "rel_err_vs_fd": 1e-12}
    data = {
        "date": "2026-01-01 00:00 UTC",
        "smoke": True,
        "machine": {
            "git_commit": "abc",
            "cpu": "cpu",
            "cpu_count": 2,
            "versions": {"torch": "2.13.0"},
        },
        "json_path": "benchmarks/results/x.json",
        "peer_versions": {"peer_ours": "2.0", "peer_curvlinops": "unavailable: missing"},
        "config": C.CONFIGS["smoke"],
        "problems": {
            "mlp_digits": {
                "description": "d",
                "num_params": 3,
                "peers": {
                    "peer_ours": {
                        "available": None,
                        "tasks": [
                            task_ok,
                            {"kind": "eig", "status": "ok", "max_rel_err": 1e-9, "matvecs": 40},
                            {"kind": "time", "op": "hessian", "status": "ok", "ratio": 2.5},
                        ],
                    },
                    "peer_curvlinops": {"available": "curvlinops not installed"},
                },
            },
            "gpt2_tiny": {"skipped": "transformers is not installed"},
        },
        "notes": ["gpt2_tiny skipped: transformers is not installed."],
    }
    md = C.render_markdown(data)
    assert "| mlp_digits | 1.0e-12 | not installed |" in md
    assert "| mlp_digits | 1.0e-09 / 40 | not installed |" in md
    assert "| mlp_digits | 2.50 | not installed |" in md
    assert "gpt2_tiny skipped" in md


def test_self_check_flags_our_errors_and_out_of_bound_numbers():
    good = {"kind": "hvp", "op": "hessian", "status": "ok", "rel_err_vs_fd": 1e-12}
    data = {"problems": {"p": {"peers": {"peer_ours": {"available": None, "tasks": [good]}}}}}
    assert C.self_check(data) == []
    bad = {"kind": "eig", "status": "ok", "max_rel_err": 0.3}
    broken = {"kind": "slq", "status": "error", "error": "ValueError: boom"}
    data["problems"]["p"]["peers"]["peer_ours"]["tasks"] += [bad, broken]
    # a peer's bad numbers are reported, never checked
    data["problems"]["p"]["peers"]["peer_curvlinops"] = {"available": None, "tasks": [bad]}
    failures = C.self_check(data)
    assert len(failures) == 2
    assert "max_rel_err" in failures[0] and "boom" in failures[1]

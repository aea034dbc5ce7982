"""lanczos_tridiagonal against dense float64 oracles: T = Q^T A Q, moments, breakdown."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hessian_eigenthings import LambdaOperator
from hessian_eigenthings.algorithms.lanczos_tridiagonal import LanczosTridiag, lanczos_tridiagonal

DT = torch.float64


def dense_op(
    eigs: np.ndarray, seed: int = 0, dtype: torch.dtype = DT
) -> tuple[torch.Tensor, LambdaOperator]:
    """A = U diag(eigs) U^T with a random orthogonal U; counts matvecs in op.calls."""
    n = len(eigs)
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (U * torch.as_tensor(eigs, dtype=DT)) @ U.T
    A = (0.5 * (A + A.T)).to(dtype)
    op = LambdaOperator(lambda v: A @ v, n, dtype=dtype)
    return A, op


def counting(A: torch.Tensor) -> LambdaOperator:
    calls = {"n": 0}

    def mv(v: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return A @ v

    op = LambdaOperator(mv, A.shape[0], dtype=A.dtype)
    op.calls = calls  # type: ignore[attr-defined]
    return op


def start(n: int, seed: int = 1, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT).to(dtype)


def test_full_run_recovers_the_spectrum_and_the_projection() -> None:
    eigs = np.linspace(-3.0, 5.0, 40) + np.r_[np.zeros(39), 20.0]
    A, op = dense_op(eigs)
    res = lanczos_tridiagonal(op, start(40), 40)
    assert isinstance(res, LanczosTridiag)
    assert res.iterations == 40 and res.alphas.dtype == DT and res.betas.shape == (39,)
    Q = res.basis
    assert Q is not None
    # Q orthonormal and Q A Q^T == T (rows are the Lanczos vectors).
    torch.testing.assert_close(Q @ Q.T, torch.eye(40, dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(Q @ A @ Q.T, res.matrix(), atol=1e-10, rtol=0)
    ritz = np.sort(torch.linalg.eigvalsh(res.matrix()).numpy())
    np.testing.assert_allclose(ritz, np.sort(np.linalg.eigvalsh(A.numpy())), atol=1e-10)


def test_partial_run_satisfies_the_lanczos_relation_and_matches_moments() -> None:
    rng = np.random.default_rng(0)
    eigs = np.concatenate([rng.uniform(0, 1, 195), [5.0, 8.0, 13.0, 21.0, 34.0]])
    A, op = dense_op(eigs, seed=3)
    v0 = start(200, seed=4)
    m = 12
    res = lanczos_tridiagonal(op, v0, m)
    Q, T = res.basis, res.matrix()
    assert Q is not None
    # A Q_m^T = Q_m^T T + beta_m q_{m+1} e_m^T: the residual is orthogonal to Q and has norm beta_m.
    R = A @ Q.T - Q.T @ T
    torch.testing.assert_close(R[:, :-1], torch.zeros_like(R[:, :-1]), atol=1e-10, rtol=0)
    torch.testing.assert_close(R[:, -1].norm(), res.last_beta, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(Q @ R[:, -1], torch.zeros(m, dtype=DT), atol=1e-10, rtol=0)
    # Gauss quadrature: e1^T T^k e1 = q1^T A^k q1 for k < 2m.
    q1 = v0 / v0.norm()
    e1 = torch.zeros(m, dtype=DT)
    e1[0] = 1
    for k in range(2 * m):
        want = q1 @ torch.linalg.matrix_power(A, k) @ q1
        got = e1 @ torch.linalg.matrix_power(T, k) @ e1
        assert abs(float(got - want)) <= 1e-9 * max(1.0, abs(float(want))), k


def test_breakdown_on_an_invariant_krylov_space_stops_early() -> None:
    eigs = np.repeat([1.0, 2.0, 7.0], [10, 15, 5])
    A, _ = dense_op(eigs, seed=5)
    op = counting(A)
    res = lanczos_tridiagonal(op, start(30), 25)
    assert res.breakdown
    assert res.iterations == 3
    np.testing.assert_allclose(
        np.sort(torch.linalg.eigvalsh(res.matrix()).numpy()), [1.0, 2.0, 7.0], atol=1e-10
    )
    # the breakdown test runs every 8 steps: at most 7 wasted products, all counted
    assert res.num_matvecs == op.calls["n"]  # type: ignore[attr-defined]
    assert 3 <= res.num_matvecs <= 8
    assert torch.isfinite(res.alphas).all() and torch.isfinite(res.betas).all()
    assert float(res.last_beta) < 1e-12


def test_identity_breaks_down_after_one_step_without_nan() -> None:
    op = LambdaOperator(lambda v: 2.0 * v, 10, dtype=DT)
    res = lanczos_tridiagonal(op, start(10), 5)
    assert res.iterations == 1 and res.breakdown
    assert float(res.alphas[0]) == pytest.approx(2.0)
    assert res.betas.numel() == 0


def test_max_iter_is_capped_at_n() -> None:
    _, op = dense_op(np.arange(1.0, 9.0))
    res = lanczos_tridiagonal(op, start(8), 50)
    assert res.iterations == 8 and res.num_matvecs == 8


def test_no_ghost_eigenvalues_with_reorthogonalization() -> None:
    # Well-separated outliers converge early; without reorthogonalisation they come back
    # as ghost copies. With it, the m-step Ritz values have no near-duplicates of them.
    eigs = np.concatenate([np.linspace(0.0, 1.0, 300), [50.0, 100.0]])
    _, op = dense_op(eigs, seed=7)
    res = lanczos_tridiagonal(op, start(302, seed=8), 80)
    ritz = torch.linalg.eigvalsh(res.matrix()).numpy()
    for outlier in (50.0, 100.0):
        assert np.sum(np.abs(ritz - outlier) < 1e-3) == 1
    plain = lanczos_tridiagonal(op, start(302, seed=8), 80, reorthogonalize=False)
    assert plain.basis is None and plain.iterations == 80
    ritz_plain = torch.linalg.eigvalsh(plain.matrix()).numpy()
    assert np.sum(np.abs(ritz_plain - 100.0) < 1e-3) >= 2  # the ghost the default avoids


def test_float32_operator_with_float64_vectors() -> None:
    _, op = dense_op(np.linspace(1.0, 2.0, 50), dtype=torch.float32)
    res = lanczos_tridiagonal(op, start(50), 10)
    assert res.alphas.dtype == DT and res.basis is not None and res.basis.dtype == DT
    res32 = lanczos_tridiagonal(op, start(50, dtype=torch.float32), 10)
    assert res32.alphas.dtype == DT and res32.basis is not None
    assert res32.basis.dtype == torch.float32
    ritz = torch.linalg.eigvalsh(res32.matrix())
    assert float(ritz.min()) >= 1.0 - 1e-4 and float(ritz.max()) <= 2.0 + 1e-4


def test_bad_input() -> None:
    _, op = dense_op(np.arange(1.0, 6.0))
    with pytest.raises(ValueError, match="max_iter"):
        lanczos_tridiagonal(op, start(5), 0)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        lanczos_tridiagonal(op, start(4), 3)
    with pytest.raises(ValueError, match="nonzero"):
        lanczos_tridiagonal(op, torch.zeros(5, dtype=DT), 3)
    with pytest.raises(TypeError, match="floating"):
        lanczos_tridiagonal(op, torch.ones(5, dtype=torch.int64), 3)
    with pytest.raises(TypeError, match="CurvatureOperator"):
        lanczos_tridiagonal(lambda v: v, start(5), 3)  # type: ignore[arg-type]
    nonsym = LambdaOperator(lambda v: v, 5, dtype=DT, symmetric=False)
    with pytest.raises(ValueError, match="symmetric"):
        lanczos_tridiagonal(nonsym, start(5), 3)


def test_docstring_example_runs() -> None:
    import doctest
    import importlib

    module = importlib.import_module("hessian_eigenthings.algorithms.lanczos_tridiagonal")
    failures, attempted = doctest.testmod(module, extraglobs={"torch": torch})
    assert failures == 0 and attempted > 0

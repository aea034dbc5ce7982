"""Power iteration and deflated power iteration against numpy.linalg.eigh.

Oracles: dense float64 ``Q diag(lam) Q^T`` with known spectra, eigenvalues from
``numpy.linalg.eigvalsh``, true residuals ``||A v - lambda v||`` from the dense matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hessian_eigenthings.algorithms as algorithms
from hessian_eigenthings import LambdaOperator
from hessian_eigenthings.algorithms.power_iteration import (
    deflated_power_iteration,
    power_iteration_one,
)
from hessian_eigenthings.algorithms.results import EigenResult

F64 = torch.float64


def _dense(lam: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=F64))
    a = (q * lam) @ q.T
    return (a + a.T) / 2


def _op(a: torch.Tensor, dtype: torch.dtype = F64) -> LambdaOperator:
    mat = a.to(dtype)
    return LambdaOperator(lambda v: mat @ v, a.shape[0], dtype=dtype)


@pytest.fixture(scope="module")
def well_separated() -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    lam = torch.cat([torch.tensor([20.0, -12.0, 8.0]), 4 * torch.rand(297, generator=g) - 2])
    a = _dense(lam.to(F64), seed=1)
    evals = np.linalg.eigvalsh(a.numpy())
    return a, evals[np.argsort(-np.abs(evals))]


def _true_residuals(a: torch.Tensor, res: EigenResult) -> torch.Tensor:
    v = res.eigenvectors.to(F64)
    return torch.linalg.vector_norm(v @ a - res.eigenvalues[:, None] * v, dim=1)


def test_power_iteration_one(well_separated: tuple[torch.Tensor, np.ndarray]) -> None:
    a, evals = well_separated
    res = power_iteration_one(_op(a), max_iter=500, tol=1e-10, seed=0)
    assert res.all_converged and res.k == 1
    assert abs(res.eigenvalues[0].item() - evals[0]) <= 1e-9 * abs(evals[0])
    # The reported residual is the true one of the returned pair.
    torch.testing.assert_close(_true_residuals(a, res), res.residuals, rtol=1e-6, atol=1e-12)
    assert res.residuals[0] <= 1e-10 * abs(evals[0])
    eigenvalue, eigenvector = res
    assert eigenvalue.shape == (1,) and eigenvector.shape == (1, a.shape[0])


def test_import_path_from_spec() -> None:
    assert algorithms.power_iteration_one is power_iteration_one


def test_init_vec_exact_eigenvector_converges_at_once(
    well_separated: tuple[torch.Tensor, np.ndarray],
) -> None:
    a, evals = well_separated
    w, q = np.linalg.eigh(a.numpy())
    top = torch.from_numpy(q[:, np.argmax(np.abs(w))].copy())
    res = power_iteration_one(_op(a), max_iter=50, tol=1e-8, init_vec=3.0 * top)
    assert res.all_converged and res.num_matvecs == 1
    assert abs(res.eigenvalues[0].item() - evals[0]) <= 1e-10 * abs(evals[0])


def test_deflated_power_iteration(well_separated: tuple[torch.Tensor, np.ndarray]) -> None:
    a, evals = well_separated
    res = deflated_power_iteration(_op(a), 3, max_iter=2000, tol=1e-9, seed=1)
    assert res.all_converged
    np.testing.assert_allclose(res.eigenvalues.numpy(), evals[:3], rtol=1e-8)
    v = res.eigenvectors
    assert torch.allclose(v @ v.T, torch.eye(3, dtype=F64), atol=1e-8)
    torch.testing.assert_close(_true_residuals(a, res), res.residuals, rtol=1e-6, atol=1e-12)


def test_budget_exhaustion_is_flagged() -> None:
    """Eigenvalues 10 and 9.9: power iteration cannot converge in 30 steps."""
    lam = torch.cat([torch.tensor([10.0, 9.9]), torch.linspace(0, 5, 198)]).to(F64)
    a = _dense(lam, seed=2)
    res = deflated_power_iteration(_op(a), 2, max_iter=30, tol=1e-10, seed=0)
    assert res.num_matvecs == 60
    assert not res.converged.any()
    # Honest: reported residuals are the true ones and above the tolerance.
    torch.testing.assert_close(_true_residuals(a, res), res.residuals, rtol=1e-6, atol=1e-12)
    assert torch.all(res.residuals > 1e-10 * res.eigenvalues.abs())


def test_bf16_operator() -> None:
    lam = torch.cat([torch.tensor([20.0, 10.0]), torch.linspace(-2, 2, 198)]).to(F64)
    a = _dense(lam, seed=3)
    res = power_iteration_one(_op(a, torch.bfloat16), max_iter=300, seed=0)
    assert res.eigenvectors.dtype == torch.float32
    top = np.abs(np.linalg.eigvalsh(a.to(torch.bfloat16).to(F64).numpy())).max()
    assert abs(res.eigenvalues[0].item() - top) <= 4 * 2**-8 * 20.0
    assert res.all_converged


def test_seeds() -> None:
    a = _dense(torch.linspace(1.0, 3.0, 50, dtype=F64), seed=4)
    r1 = deflated_power_iteration(_op(a), 2, max_iter=20, seed=5)
    r2 = deflated_power_iteration(_op(a), 2, max_iter=20, seed=5)
    assert torch.equal(r1.eigenvectors, r2.eigenvectors) and r1.seed == 5
    torch.manual_seed(0)
    f1 = power_iteration_one(_op(a), max_iter=5)
    torch.manual_seed(0)
    f2 = power_iteration_one(_op(a), max_iter=5)
    assert f1.seed != f2.seed and not torch.equal(f1.eigenvectors, f2.eigenvectors)


def test_bad_inputs() -> None:
    a = _dense(torch.linspace(1.0, 3.0, 10, dtype=F64), seed=4)
    op = _op(a)
    with pytest.raises(ValueError, match="k must be"):
        deflated_power_iteration(op, 11)
    with pytest.raises(ValueError, match="max_iter"):
        power_iteration_one(op, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        power_iteration_one(op, tol=2.0)
    with pytest.raises(ValueError, match="init_vec"):
        power_iteration_one(op, init_vec=torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="nonzero"):
        power_iteration_one(op, init_vec=torch.zeros(10, dtype=F64))
    with pytest.raises(TypeError, match="CurvatureOperator"):
        power_iteration_one(a)  # type: ignore[arg-type]
    nonsym = LambdaOperator(lambda v: a @ v, 10, dtype=F64, symmetric=False)
    with pytest.raises(ValueError, match="symmetric=True"):
        deflated_power_iteration(nonsym, 2)
    bad = LambdaOperator(lambda v: v * float("inf"), 10, dtype=F64)
    with pytest.raises(FloatingPointError, match="non-finite"):
        power_iteration_one(bad, seed=0)

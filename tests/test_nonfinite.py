"""Non-finite products: detected, named (operator, product, batch, parameter block), and the
results computed before them returned on the exception with honest flags.

Oracles: the dense float64 matrix (true residuals of the partial eigenpairs), and the same
run on a clean operator (the partial results must be exactly its first products' results).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    EigenResult,
    HessianOperator,
    LambdaOperator,
    NonFiniteError,
    deflated_power_iteration,
    diagonal,
    lanczos,
    spectral_density,
    stochastic_power_iteration,
    trace,
)
from tests.helpers import assert_unchanged, dense_hessian, snapshot

N = 50


def _matrix() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64))
    ev = torch.cat(
        [
            torch.tensor([10.0, 9.0, 8.0], dtype=torch.float64),
            7.5 * torch.rand(N - 3, generator=gen),
        ]
    )
    return (q * ev) @ q.T


A = _matrix()


def poisoned(
    bad: int | None, value: float = float("nan"), matrix: torch.Tensor = A
) -> LambdaOperator:
    """``matrix`` whose ``bad``-th product (1-based, counting columns) returns ``value``."""
    count = [0]

    def mm(x: torch.Tensor) -> torch.Tensor:
        out = matrix @ x
        cols = 1 if x.dim() == 1 else x.shape[1]
        for j in range(cols):
            count[0] += 1
            if count[0] == bad:
                if x.dim() == 1:
                    out = out.clone()
                    out[3] = value
                else:
                    out = out.clone()
                    out[3, j] = value
        return out

    return LambdaOperator(mm, matrix.shape[0], dtype=torch.float64, matmat_fn=mm)


def _check_honest(partial: EigenResult) -> None:
    """Reported residuals bound the true ones; flags follow the residuals."""
    for lam, v, r in zip(partial.eigenvalues, partial.eigenvectors, partial.residuals):
        true = torch.linalg.vector_norm(A @ v - lam * v)
        assert true <= r * (1 + 1e-6) + 1e-12
    assert partial.stop_reason == "non_finite"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("bad", [1, 3, 17, 43])
def test_lanczos_names_the_product_and_returns_the_clean_ritz_pairs(bad: int, value: float) -> None:
    with pytest.raises(NonFiniteError) as info:
        lanczos(poisoned(bad, value), k=3, seed=0, basis_size=16)
    err = info.value
    assert isinstance(err, FloatingPointError) and isinstance(err, ValueError)
    assert err.matvec == bad
    assert "LambdaOperator" in str(err) and f"product {bad} " in str(err)
    if bad <= 3:
        assert err.partial is None  # fewer than k clean products
        return
    partial = err.partial
    assert isinstance(partial, EigenResult) and partial.k == 3
    assert partial.num_matvecs >= bad - 1  # counts every product spent
    assert bool(torch.isfinite(partial.eigenvalues).all())
    assert bool(torch.isfinite(partial.eigenvectors).all())
    _check_honest(partial)
    flags = partial.residuals <= partial.tol * partial.eigenvalues.abs()
    assert torch.equal(partial.converged, flags)
    if bad == 43:  # enough clean products to have found the top three
        assert torch.allclose(
            partial.eigenvalues, torch.tensor([10.0, 9.0, 8.0], dtype=torch.float64)
        )


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
@pytest.mark.parametrize("bad", [2, 25])
def test_trace_names_the_product_and_keeps_the_clean_estimate(method: str, bad: int) -> None:
    clean = trace(poisoned(None), 60, method=method, seed=3, block_size=4)
    with pytest.raises(NonFiniteError) as info:
        trace(poisoned(bad), 60, method=method, seed=3, block_size=4)
    err = info.value
    assert err.matvec == bad and "LambdaOperator" in str(err)
    partial = err.partial
    if bad == 2:
        assert partial is None
        return
    assert partial.stop_reason == "non_finite"
    assert np.isfinite(partial.estimate) and np.isfinite(partial.stderr)
    assert partial.num_matvecs == bad - 1
    if method == "hutchinson":
        # Exactly the first bad-1 quadratic forms of the clean run.
        assert np.array_equal(partial.samples, clean.samples[: bad - 1])
        assert partial.estimate == float(partial.samples.mean())
    else:
        # Cut short inside the sketch: Hutchinson on the sketch probes made so far.
        assert partial.details["partial_estimator"] == "hutchinson_on_sketch"
        sketch = {"hutch++": 60 // 3, "xtrace": 60 // 2}[method]
        assert partial.details["num_probes"] == min(bad - 1, sketch)


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_names_the_product_and_keeps_the_clean_estimate(method: str) -> None:
    with pytest.raises(NonFiniteError) as info:
        diagonal(poisoned(13), 40, method=method, seed=3, block_size=4)
    err = info.value
    assert err.matvec == 13 and "LambdaOperator" in str(err)
    partial = err.partial
    assert partial.stop_reason == "non_finite" and partial.num_matvecs == 12
    assert bool(torch.isfinite(partial.estimate).all())


@pytest.mark.parametrize("block_size", [1, 16])
def test_slq_returns_the_runs_cut_before_the_bad_product(block_size: int) -> None:
    """The runs started before the bad product, each cut before its first bad step.

    ``block_size=1``: one run after another; product 25 is step 5 of run 3, so runs 1-2
    are whole and run 3 keeps its 4 clean steps. ``block_size=16``: the 5 runs go in
    lockstep (5 products per step); product 25 is step 5 of run 5, which keeps 4 steps.
    """
    kw: dict[str, Any] = {"num_runs": 5, "lanczos_steps": 10, "seed": 1}
    clean = spectral_density(poisoned(None), block_size=block_size, **kw)
    with pytest.raises(NonFiniteError) as info:
        spectral_density(poisoned(25), block_size=block_size, **kw)
    err = info.value
    where = "runs 3-3 of 5" if block_size == 1 else "runs 1-5 of 5"
    assert err.matvec == 25 and where in str(err)
    partial = err.partial
    whole = 2 if block_size == 1 else 4
    # the products behind the rules it holds: the whole runs' and the 4 clean steps
    assert partial.stop_reason == "non_finite" and partial.num_matvecs == whole * 10 + 4
    assert partial.num_runs == whole + 1
    for x, y in zip(partial.nodes[:whole], clean.nodes[:whole]):
        assert np.array_equal(x, y)  # the clean runs are the uninterrupted call's
    assert len(partial.nodes[whole]) == 4  # the bad run, cut at its 4 clean steps
    assert abs(partial.integral() - 1.0) < 1e-3


def test_power_iterations_return_the_pairs_found_before() -> None:
    clean = deflated_power_iteration(poisoned(None), 2, max_iter=400, seed=0)
    first = clean.num_matvecs - 1  # poison the very last product of the second pair
    with pytest.raises(NonFiniteError) as info:
        deflated_power_iteration(poisoned(first + 1), 2, max_iter=400, seed=0)
    partial = info.value.partial
    assert info.value.matvec == first + 1
    assert partial.k >= 1 and partial.stop_reason == "non_finite"
    assert torch.equal(partial.eigenvalues[0], clean.eigenvalues[0])
    _check_honest(partial)
    with pytest.raises(NonFiniteError, match="momentum") as sinfo:
        stochastic_power_iteration(poisoned(90), 2, max_iter=60, seed=0)
    assert sinfo.value.partial.k == 1  # the first pair (60 products) was finished


# -- data operators: the batch and the parameter block -------------------------------------


def _model_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    data = [
        (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64))
        for _ in range(3)
    ]
    return model, data


def _poisoned_loss(
    data: list[Any], state: dict[str, bool]
) -> Callable[[nn.Module, Any], torch.Tensor]:
    """MSE, plus ``c * ||bias of layer 2||^2`` with ``c = inf`` on batch 1 once poisoned.

    Only the ``2.bias`` block of the Hessian product becomes non-finite.
    """

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        out = ((model(x) - y) ** 2).mean()
        if state["poison"] and torch.equal(x, data[1][0]):
            out = out + float("inf") * (model[2].bias ** 2).sum()
        return out

    return loss


def test_hessian_operator_names_the_batch_and_the_parameter_block() -> None:
    model, data = _model_and_data()
    state = {"poison": False}
    op = HessianOperator(model, data, _poisoned_loss(data, state))
    before = snapshot(model)
    state["poison"] = True
    with pytest.raises(NonFiniteError) as info:
        op.matvec(torch.ones(op.size, dtype=torch.float64))
    err = info.value
    msg = str(err)
    assert "HessianOperator" in msg and "batch index 1" in msg and "2.bias" in msg
    assert "0.weight" not in msg
    assert err.batch_index == 1 and err.param_names == ("2.bias",)
    assert_unchanged(model, before)


def test_lanczos_on_a_hessian_whose_loss_goes_non_finite_mid_run() -> None:
    model, data = _model_and_data()
    state = {"poison": False}
    op = HessianOperator(model, data, _poisoned_loss(data, state))
    before = snapshot(model)
    checks = [0]

    def poison_after_first_check(progress: Any) -> None:
        checks[0] += 1
        state["poison"] = True

    with pytest.raises(NonFiniteError) as info:
        lanczos(op, k=2, seed=0, basis_size=12, callback=poison_after_first_check)
    err = info.value
    assert err.batch_index == 1 and err.param_names == ("2.bias",)
    assert "batch index 1" in str(err) and "2.bias" in str(err)
    partial = err.partial
    assert isinstance(partial, EigenResult) and partial.stop_reason == "non_finite"
    assert err.matvec == partial.num_matvecs + 1
    assert bool(torch.isfinite(partial.eigenvalues).all())
    assert_unchanged(model, before)
    # The partial pairs are Ritz pairs of the clean Hessian: compare with a dense oracle.
    state["poison"] = False
    H = dense_hessian(model, data, _poisoned_loss(data, state))
    for lam, v, r in zip(partial.eigenvalues, partial.eigenvectors, partial.residuals):
        assert torch.linalg.vector_norm(H @ v - lam * v) <= r * (1 + 1e-6) + 1e-10


@pytest.mark.parametrize("method", ["xtrace", "xdiag"])
@pytest.mark.parametrize("bad", [23, 30, 38])
def test_rank_deficient_fallback_names_the_product(method: str, bad: int) -> None:
    """A bad product inside the fallback of a rank-deficient sketch (products 21-40) is
    caught at once, with its number and the sketch probes' Hutchinson estimate."""
    from tests._long_run_problems import low_rank, matrix

    def run(op: LambdaOperator) -> Any:
        if method == "xtrace":
            return trace(low_rank(op), 40, method="xtrace", seed=4, block_size=3)
        return diagonal(low_rank(op), 40, method="xdiag", seed=4, block_size=3)

    clean = run(poisoned(None, matrix=matrix()))
    assert clean.details["sketch_rank"] < clean.details["sketch_size"] == 20
    with pytest.raises(NonFiniteError) as info:
        run(poisoned(bad, matrix=matrix()))
    err = info.value
    assert err.matvec == bad and "non-finite" in str(err)
    partial = err.partial
    assert partial.stop_reason == "non_finite"
    assert partial.details["partial_estimator"] == "hutchinson_on_sketch"
    assert partial.details["num_probes"] == 20

"""One contract, run over every operator: add a case (one line) to CASES to join.

Each case builds ``(operator, model_or_None)`` in float64. Properties checked:
linearity, symmetry <u, A v> = <A u, v>, dtype/device kept, determinism, model state
untouched (parameters, requires_grad, .grad, buffers, training flags).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LambdaOperator,
    MCFisherOperator,
)
from hessian_eigenthings.loss_fns.standard import (
    cross_entropy_loss_of_output,
    mse_loss_of_output,
    supervised_forward,
)
from hessian_eigenthings.operators.base import CurvatureOperator
from tests.helpers import assert_unchanged, snapshot

Case = Callable[[], tuple[CurvatureOperator, nn.Module | None]]


def _mlp_data(seed: int = 0) -> tuple[nn.Module, list[Any]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = [(torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (5, 3)]
    return model, data


def _ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _bn_model() -> tuple[nn.Module, list[Any]]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    model.train()
    data = [(torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (6, 4)]
    model.zero_grad()
    _ce(model, data[0]).backward()  # a pre-existing .grad that must survive
    return model, data


def _lambda() -> tuple[CurvatureOperator, None]:
    torch.manual_seed(0)
    a = torch.randn(7, 7, dtype=torch.float64)
    a = a + a.T
    return LambdaOperator(lambda v: a @ v, 7, dtype=torch.float64), None


def _hessian() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    return HessianOperator(model, data, _ce), model


def _hessian_fd() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    return HessianOperator(model, data, _ce, method="finite_difference"), model


def _hessian_bn_train() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _bn_model()
    return HessianOperator(model, data, _ce), model


def _hessian_filtered_micro() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    return HessianOperator(model, data, _ce, param_filter="2.*", microbatch_size=2), model


def _ggn() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    return GGNOperator(model, data, supervised_forward, cross_entropy_loss_of_output()), model


def _ggn_mse() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    data = [(x, torch.sin(x[:, :3])) for x, _ in data]
    return GGNOperator(model, data, supervised_forward, mse_loss_of_output()), model


def _ggn_autograd() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    loss = cross_entropy_loss_of_output()
    return GGNOperator(model, data, supervised_forward, loss, loss_hvp="autograd"), model


def _ggn_fd() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    loss = cross_entropy_loss_of_output()
    return GGNOperator(model, data, supervised_forward, loss, jvp="finite_difference"), model


def _ggn_bn_train() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _bn_model()
    return GGNOperator(model, data, supervised_forward, cross_entropy_loss_of_output()), model


def _empirical_fisher() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    per_sample = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    return EmpiricalFisherOperator(model, data, per_sample, microbatch_size=2), model


def _mc_fisher() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    return MCFisherOperator(model, data, supervised_forward, num_samples=3, seed=0), model


def _hessian_vmap_kept() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    return HessianOperator(model, data, _ce, block_mode="vmap", keep_graphs=True), model


def _ggn_vmap_chunks() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    loss = cross_entropy_loss_of_output()
    return GGNOperator(model, data, supervised_forward, loss, block_mode="vmap", max_block=2), model


def _ggn_kept() -> tuple[CurvatureOperator, nn.Module]:
    model, data = _mlp_data()
    loss = cross_entropy_loss_of_output()
    return GGNOperator(model, data, supervised_forward, loss, keep_graphs=True), model


CASES: dict[str, Case] = {
    "lambda": _lambda,
    "hessian": _hessian,
    "hessian_fd": _hessian_fd,
    "hessian_bn_train": _hessian_bn_train,
    "hessian_filtered_micro": _hessian_filtered_micro,
    "ggn": _ggn,
    "ggn_mse": _ggn_mse,
    "ggn_autograd": _ggn_autograd,
    "ggn_fd": _ggn_fd,
    "ggn_bn_train": _ggn_bn_train,
    "empirical_fisher": _empirical_fisher,
    "mc_fisher": _mc_fisher,
    "hessian_vmap_kept": _hessian_vmap_kept,
    "ggn_vmap_chunks": _ggn_vmap_chunks,
    "ggn_kept": _ggn_kept,
}

# Tolerances: exact operators to rounding; finite differences to their O(h^2) error.
TOL = {"hessian_fd": 1e-7, "ggn_fd": 1e-7}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, CurvatureOperator, nn.Module | None]:
    op, model = CASES[request.param]()
    return request.param, op, model


def test_linearity(case: tuple[str, CurvatureOperator, nn.Module | None]) -> None:
    name, op, _ = case
    g = torch.Generator().manual_seed(0)
    u = torch.randn(op.size, generator=g, dtype=op.dtype)
    v = torch.randn(op.size, generator=g, dtype=op.dtype)
    lhs = op.matvec(2.5 * u - 0.75 * v)
    rhs = 2.5 * op.matvec(u) - 0.75 * op.matvec(v)
    assert float((lhs - rhs).norm() / rhs.norm()) <= TOL.get(name, 1e-12)


def test_symmetry(case: tuple[str, CurvatureOperator, nn.Module | None]) -> None:
    name, op, _ = case
    g = torch.Generator().manual_seed(1)
    u = torch.randn(op.size, generator=g, dtype=op.dtype)
    v = torch.randn(op.size, generator=g, dtype=op.dtype)
    a = torch.dot(u, op.matvec(v))
    b = torch.dot(op.matvec(u), v)
    scale = op.matvec(u).norm() * v.norm()
    assert float((a - b).abs() / scale) <= TOL.get(name, 1e-12)
    assert op.symmetric


def test_dtype_device_kept(case: tuple[str, CurvatureOperator, nn.Module | None]) -> None:
    _, op, _ = case
    v = torch.randn(op.size, dtype=op.dtype, device=op.device)
    out = op.matvec(v)
    assert out.shape == v.shape and out.dtype == v.dtype and out.device == v.device
    block = torch.randn(op.size, 3, dtype=op.dtype, device=op.device)
    outb = op.matmat(block)
    assert outb.shape == block.shape and outb.dtype == block.dtype
    torch.testing.assert_close(outb[:, 1], op.matvec(block[:, 1]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ v, out, rtol=0, atol=0)


def test_deterministic(case: tuple[str, CurvatureOperator, nn.Module | None]) -> None:
    _, op, _ = case
    v = torch.randn(op.size, dtype=op.dtype)
    assert torch.equal(op.matvec(v), op.matvec(v))


def test_model_state_untouched(case: tuple[str, CurvatureOperator, nn.Module | None]) -> None:
    _, op, model = case
    if model is None:
        pytest.skip("operator has no model")
    snap = snapshot(model)
    op.matvec(torch.randn(op.size, dtype=op.dtype))
    assert_unchanged(model, snap)


def test_psd_quadratic_form_nonnegative(
    case: tuple[str, CurvatureOperator, nn.Module | None],
) -> None:
    _, op, _ = case
    if not op.psd:
        pytest.skip("operator is not flagged PSD")
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        v = torch.randn(op.size, generator=g, dtype=op.dtype)
        assert float(torch.dot(v, op.matvec(v))) >= -1e-12 * float(v.norm() ** 2)

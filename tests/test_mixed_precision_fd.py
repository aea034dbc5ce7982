"""Finite differences under mixed precision: the step comes from the dtype the model computes in.

Parameters stored in float32 and run in bfloat16 (``torch.autocast``, FSDP2's
``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``) used to get the float32 step
(4.9e-3), below bfloat16's resolution: the perturbation was rounded away and the
product was noise (85% to 162% off on the MLP below, silently). Now the compute dtype is
observed (or given) and the step is bfloat16's ``eps ** (1/3) = 0.2``.

Oracle: the model the bfloat16 computation approximates, in exact arithmetic: its
parameters rounded to bfloat16 (what autocast feeds the matrix products), evaluated in
float64 (dense Hessian / GGN by double backward / forward mode). What bfloat16 finite
differences can deliver there: ``O(h^2 + eps/h) = O(eps^(2/3))``, about 4% (a
bfloat16-*stored* copy of the model, the mode supported before, measures the same).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_eigenthings import GGNOperator, HessianOperator
from hessian_eigenthings.loss_fns.standard import cross_entropy_loss_of_output, supervised_forward

BF16_EPS = float(torch.finfo(torch.bfloat16).eps)
# central differences at h = eps^(1/3): truncation + rounding ~ 2 eps^(2/3) = 7.8%
BF16_FD_BOUND = 2 * BF16_EPS ** (2 / 3)
DIRECTIONS = 8


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).to(dtype)


def _data() -> list[Any]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g))]


def _ce(m: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


def _ce_autocast(m: nn.Module, b: Any) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return F.cross_entropy(m(b[0]), b[1])


def _oracle_model(model: nn.Module) -> nn.Module:
    """The bf16-computed model in exact arithmetic: bf16-rounded parameters, in float64."""
    ref = _mlp(torch.float64)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters()):
            p.copy_(q.to(torch.bfloat16).double())
    return ref


def _oracle_data(data: list[Any]) -> list[Any]:
    return [(x.to(torch.bfloat16).double(), y) for x, y in data]


def _worst_error(op: Any, oracle: Any, region: Any = contextlib.nullcontext) -> float:
    """Largest relative error over random directions; ``op``'s products inside ``region()``."""
    errs = []
    for seed in range(DIRECTIONS):
        v = torch.randn(op.size, generator=torch.Generator().manual_seed(seed))
        want = oracle.matvec(v.double())
        with region():
            got = op.matvec(v).double()
        errs.append(float((got - want).norm() / want.norm()))
    return max(errs)


def test_autocast_inside_the_loss_is_detected() -> None:
    model, data = _mlp(), _data()
    op = HessianOperator(model, data, _ce_autocast, method="finite_difference")
    assert op.fd_eps == pytest.approx(BF16_EPS ** (1 / 3))
    oracle = HessianOperator(_oracle_model(model), _oracle_data(data), _ce)
    assert _worst_error(op, oracle) <= BF16_FD_BOUND


def test_bf16_stored_model_reaches_the_same_accuracy() -> None:
    """The reference point: a bfloat16-stored copy, whose step always came from bfloat16."""
    model, data = _mlp(), _data()
    stored = _mlp(torch.bfloat16)
    stored.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    data_bf16 = [(x.to(torch.bfloat16), y) for x, y in data]
    op = HessianOperator(
        stored,
        data_bf16,
        lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]),
        method="finite_difference",
    )
    oracle = HessianOperator(_oracle_model(model), _oracle_data(data), _ce)
    assert _worst_error(op, oracle) <= BF16_FD_BOUND


def test_compute_dtype_costs_no_forward_beyond_the_construction_probe() -> None:
    # Observed or given, the compute dtype adds no forward: the observation rides on the
    # construction probe's one forward (the graph check).
    model, data = _mlp(), _data()
    calls = {"n": 0}

    def counted(m: nn.Module, b: Any) -> torch.Tensor:
        calls["n"] += 1
        return _ce_autocast(m, b)

    ops = {}
    for given in (None, torch.bfloat16):
        calls["n"] = 0
        ops[given] = HessianOperator(
            model,
            data,
            counted,
            method="finite_difference",
            fd_compute_dtype=given,
            check_determinism=False,
        )
        assert calls["n"] == 1, given
    for op in ops.values():
        assert op.fd_eps == pytest.approx(BF16_EPS ** (1 / 3))
    oracle = HessianOperator(_oracle_model(model), _oracle_data(data), _ce)
    assert _worst_error(ops[torch.bfloat16], oracle) <= BF16_FD_BOUND


def test_autocast_around_the_product_lowers_the_step_then() -> None:
    """Built outside autocast (float32 step), multiplied inside it: bfloat16 step."""
    model, data = _mlp(), _data()
    op = HessianOperator(model, data, _ce, method="finite_difference")
    assert op.fd_eps == pytest.approx(float(torch.finfo(torch.float32).eps) ** (1 / 3))
    oracle = HessianOperator(_oracle_model(model), _oracle_data(data), _ce)
    region = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    assert _worst_error(op, oracle, region) <= BF16_FD_BOUND


def test_a_step_below_the_compute_resolution_is_refused() -> None:
    model, data = _mlp(), _data()
    with pytest.raises(ValueError, match=r"below the resolution of torch.bfloat16.*Omit fd_eps"):
        HessianOperator(model, data, _ce_autocast, method="finite_difference", fd_eps=4.9e-3)
    op = HessianOperator(model, data, _ce, method="finite_difference", fd_eps=4.9e-3)
    v = torch.randn(op.size)
    op.matvec(v)  # fine in float32
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="bfloat16"):
        op.matvec(v)


def test_bad_compute_dtype_argument() -> None:
    with pytest.raises(TypeError, match="fd_compute_dtype must be a floating torch.dtype"):
        HessianOperator(_mlp(), _data(), _ce, method="finite_difference", fd_compute_dtype="bf16")  # type: ignore[arg-type]


def test_ggn_finite_difference_jvp_under_autocast() -> None:
    model, data = _mlp(), _data()
    ce = cross_entropy_loss_of_output()

    def forward_autocast(m: nn.Module, b: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(b[0]).float()

    op = GGNOperator(model, data, forward_autocast, ce, jvp="finite_difference")
    assert op.fd_eps == pytest.approx(BF16_EPS ** (1 / 3))
    oracle = GGNOperator(_oracle_model(model), _oracle_data(data), supervised_forward, ce)
    assert _worst_error(op, oracle) <= BF16_FD_BOUND


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_bf16_step_and_accuracy() -> None:
    """CUDA autocast (bf16 tensor-core matmuls): observed, bf16 step, bf16-level accuracy."""
    oracle = HessianOperator(_oracle_model(_mlp()), _oracle_data(_data()), _ce)
    model, data = _mlp().cuda(), [(x.cuda(), y.cuda()) for x, y in _data()]

    def loss(m: nn.Module, b: Any) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.cross_entropy(m(b[0]), b[1])

    op = HessianOperator(model, data, loss, method="finite_difference")
    assert op.fd_eps == pytest.approx(BF16_EPS ** (1 / 3))
    errs = []
    for seed in range(DIRECTIONS):
        v = torch.randn(op.size, generator=torch.Generator().manual_seed(seed))
        want = oracle.matvec(v.double())
        got = op.matvec(v.cuda()).double().cpu()
        errs.append(float((got - want).norm() / want.norm()))
    assert max(errs) <= BF16_FD_BOUND

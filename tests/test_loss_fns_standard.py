"""Closed-form loss Hessians against torch's own losses differentiated by torch.func."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian, jvp

from hessian_eigenthings.loss_fns.base import LossOfOutput, loss_of_output
from hessian_eigenthings.loss_fns.standard import (
    cross_entropy_loss_of_output,
    get_target,
    mse_loss_of_output,
    supervised_forward,
    supervised_loss,
)
from tests.helpers import rel_err

DTYPES = [torch.float32, torch.float64]
# float32: the closed form and autograd round differently; relative error ~ a few ulps
TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def _targets(shape: tuple[int, ...], num_classes: int, gen: torch.Generator) -> torch.Tensor:
    y = torch.randint(0, num_classes, shape, generator=gen)
    mask = torch.rand(shape, generator=gen) < 0.3
    y[mask] = -100
    y.view(-1)[0] = 1  # at least one valid target
    return y


CE_OPTIONS: list[dict[str, Any]] = [
    {},
    {"label_smoothing": 0.2},
    {"weight": "w"},
    {"weight": "w", "label_smoothing": 0.15},
    {"reduction": "sum"},
    {"reduction": "sum", "weight": "w", "label_smoothing": 0.1},
]


def _opts(opts: dict[str, Any], num_classes: int, dtype: torch.dtype) -> dict[str, Any]:
    out = dict(opts)
    if out.get("weight") == "w":
        g = torch.Generator().manual_seed(7)
        out["weight"] = (0.5 + 1.5 * torch.rand(num_classes, generator=g)).to(dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 3), (3, 5, 2, 2), (5,)])
@pytest.mark.parametrize("opts", CE_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_ce_value_and_hvp_match_torch(
    dtype: torch.dtype, shape: tuple[int, ...], opts: dict[str, Any]
) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    z = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    u = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    y = _targets(tshape, num_classes, gen) if tshape else torch.tensor(2)
    kw = _opts(opts, num_classes, dtype)
    loss = cross_entropy_loss_of_output(**kw)
    batch = (None, y)

    def torch_loss(zz: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(zz, y, **kw)

    torch.testing.assert_close(loss(z, batch), torch_loss(z), rtol=TOL[dtype], atol=0)
    # oracle: forward-over-reverse through torch's own cross_entropy
    want = jvp(grad(torch_loss), (z,), (u,))[1]
    got = loss.hvp(z, batch, u)
    assert got.dtype == dtype and got.shape == z.shape
    assert rel_err(got, want) <= TOL[dtype]
    # and through the returned loss itself
    assert rel_err(got, jvp(grad(lambda zz: loss(zz, batch)), (z,), (u,))[1]) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "opts", [{}, {"label_smoothing": 0.3}, {"weight": "w"}, {"reduction": "sum"}], ids=str
)
def test_ce_probability_targets(dtype: torch.dtype, opts: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64).to(dtype)
    u = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.softmax(torch.randn(4, 6, 3, generator=gen, dtype=torch.float64), 1).to(dtype)
    t[0, :, 0] *= 0.5  # targets need not sum to one: the row scale is sum_c w_c t_c
    kw = _opts(opts, 6, dtype)
    loss = cross_entropy_loss_of_output(**kw)

    def torch_loss(zz: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(zz, t, **kw)

    torch.testing.assert_close(loss(z, (None, t)), torch_loss(z), rtol=TOL[dtype], atol=0)
    want = jvp(grad(torch_loss), (z,), (u,))[1]
    assert rel_err(loss.hvp(z, (None, t), u), want) <= TOL[dtype]
    assert loss.batch_weight((None, t)) == (12 if opts.get("reduction") != "sum" else 1)


def test_ce_hessian_is_the_softmax_covariance_per_row() -> None:
    """Dense check against torch.func.hessian of torch's loss (no closed form involved)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, -100, 3, 1, -100])
    loss = cross_entropy_loss_of_output()
    H = hessian(lambda zz: F.cross_entropy(zz.view(5, 4), y))(z.reshape(-1))
    dense = torch.stack(
        [loss.hvp(z, (None, y), e.view(5, 4)).reshape(-1) for e in torch.eye(20).double()], 1
    )
    assert rel_err(dense, H) <= 1e-14
    p = torch.softmax(z, 1)
    block = (torch.diag(p[2]) - torch.outer(p[2], p[2])) / 3  # 3 valid targets
    torch.testing.assert_close(dense[8:12, 8:12], block, rtol=1e-14, atol=1e-16)
    assert torch.count_nonzero(dense[4:8]) == 0  # ignored row contributes nothing


def test_ce_batch_weight_counts_targets_not_logits() -> None:
    y = torch.tensor([[1, -100, 2], [-100, -100, 0]])
    w = cross_entropy_loss_of_output().batch_weight((None, y))
    assert isinstance(w, torch.Tensor) and w.dim() == 0 and w.dtype == torch.int64
    assert int(w) == 3
    cw = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float16)
    wt = cross_entropy_loss_of_output(weight=cw).batch_weight((None, y))
    assert wt.dtype == torch.float64 and float(wt) == 2.0 + 4.0 + 0.5
    assert cross_entropy_loss_of_output(reduction="sum").batch_weight((None, y)) == 1
    assert cross_entropy_loss_of_output(ignore_index=2).batch_weight((None, y)) == 5


@pytest.mark.parametrize("weighted", [False, True])
def test_ce_batch_weights_give_the_dataset_mean(weighted: bool) -> None:
    """sum_b w_b L_b / sum_b w_b equals cross_entropy over the concatenated dataset."""
    gen = torch.Generator().manual_seed(1)
    cw = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    loss = cross_entropy_loss_of_output(weight=cw)
    zs = [torch.randn(n, 5, 4, generator=gen, dtype=torch.float64) for n in (3, 2, 4)]
    ys = [_targets((n, 4), 5, gen) for n in (3, 2, 4)]
    ws = [loss.batch_weight((None, y)) for y in ys]
    combined = sum(w * loss(z, (None, y)) for w, z, y in zip(ws, zs, ys)) / sum(ws)
    want = F.cross_entropy(torch.cat(zs), torch.cat(ys), weight=cw)
    torch.testing.assert_close(combined, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_all_ignored_batch_is_zero_not_nan(dtype: torch.dtype) -> None:
    z = torch.randn(3, 4, 2, dtype=dtype)
    y = torch.full((3, 2), -100)
    for kw in ({}, {"weight": torch.ones(4, dtype=dtype), "label_smoothing": 0.1}):
        loss = cross_entropy_loss_of_output(**kw)
        assert float(loss(z, (None, y))) == 0.0
        hu = loss.hvp(z, (None, y), torch.randn_like(z))
        assert torch.count_nonzero(hu) == 0 and torch.isfinite(hu).all()
        assert float(loss.batch_weight((None, y))) == 0.0
        g = torch.func.grad(lambda zz: loss(zz, (None, y)))(z)  # noqa: B023
        assert torch.isfinite(g).all() and torch.count_nonzero(g) == 0


def test_ce_bfloat16_logits_use_float32_softmax() -> None:
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(8, 50, generator=gen).to(torch.bfloat16)
    u = torch.randn(8, 50, generator=gen).to(torch.bfloat16)
    y = torch.randint(0, 50, (8,), generator=gen)
    got = cross_entropy_loss_of_output().hvp(z, (None, y), u)
    assert got.dtype == torch.bfloat16
    want = jvp(grad(lambda zz: F.cross_entropy(zz, y)), (z.double(),), (u.double(),))[1]
    assert rel_err(got, want) <= 1e-2  # bfloat16 output rounding (8 bits of mantissa)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_value_hvp_and_weight(dtype: torch.dtype, reduction: str) -> None:
    gen = torch.Generator().manual_seed(5)
    o = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64).to(dtype)
    u = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64).to(dtype)
    loss = mse_loss_of_output(reduction)

    def torch_loss(oo: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(oo, y, reduction=reduction)

    torch.testing.assert_close(loss(o, (None, y)), torch_loss(o), rtol=0, atol=0)

    def plain(oo: torch.Tensor) -> torch.Tensor:  # torch 2.13's mse_loss has no jvp-of-grad
        sq = (oo - y) ** 2
        return sq.mean() if reduction == "mean" else sq.sum()

    want = jvp(grad(plain), (o,), (u,))[1]
    assert rel_err(loss.hvp(o, (None, y), u), want) <= TOL[dtype]
    assert loss.batch_weight((None, y)) == (24 if reduction == "mean" else 1)


def test_mse_batch_weights_give_elementwise_dataset_mean() -> None:
    gen = torch.Generator().manual_seed(6)
    loss = mse_loss_of_output()
    outs = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (5, 2)]
    ys = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (5, 2)]
    ws = [loss.batch_weight((None, y)) for y in ys]
    combined = sum(w * loss(o, (None, y)) for w, o, y in zip(ws, outs, ys)) / sum(ws)
    torch.testing.assert_close(combined, F.mse_loss(torch.cat(outs), torch.cat(ys)))


def test_mse_rejects_broadcasting_shapes() -> None:
    with pytest.raises(ValueError, match=r"output shape \(4, 1\) != target shape \(4,\)"):
        mse_loss_of_output()(torch.zeros(4, 1), (None, torch.zeros(4)))


def test_target_lookup_options() -> None:
    y = torch.tensor([1, 0])
    z = torch.randn(2, 3)
    want = F.cross_entropy(z, y)
    assert torch.equal(get_target((None, y)), y)
    assert torch.equal(get_target({"labels": y, "x": z}), y)
    assert torch.equal(get_target({"tgt": y}, "tgt"), y)
    assert torch.equal(get_target((y, None), 0), y)
    assert torch.equal(get_target({"a": {"b": y}}, lambda b: b["a"]["b"]), y)
    loss = cross_entropy_loss_of_output(target="tgt")
    torch.testing.assert_close(loss(z, {"tgt": y}), want)
    with pytest.raises(ValueError, match="no 'labels'"):
        get_target({"x": z})
    with pytest.raises(ValueError, match="Cannot take target 'y'"):
        get_target({"x": z}, "y")
    with pytest.raises(ValueError, match="Cannot find the target"):
        get_target(z)
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        get_target((z, [1, 0]))


def test_option_errors() -> None:
    with pytest.raises(ValueError, match=r"Unknown reduction 'none'.*EmpiricalFisherOperator"):
        cross_entropy_loss_of_output(reduction="none")
    with pytest.raises(ValueError, match="Unknown reduction 'avg'"):
        mse_loss_of_output("avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy_loss_of_output(label_smoothing=1.5)
    with pytest.raises(ValueError, match="1-D tensor of class weights"):
        cross_entropy_loss_of_output(weight=torch.ones(2, 2))
    with pytest.raises(TypeError, match="floating"):
        cross_entropy_loss_of_output(weight=torch.ones(3, dtype=torch.int64))
    loss = cross_entropy_loss_of_output()
    with pytest.raises(ValueError, match="must have shape"):
        loss.hvp(torch.zeros(4, 3), (None, torch.zeros(3, dtype=torch.int64)), torch.zeros(4, 3))


def test_supervised_helpers() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, -100, 3, 2, -100])
    crit = nn.CrossEntropyLoss(ignore_index=-100)
    lf = supervised_loss(crit)
    assert torch.equal(lf(model, (x, y)), crit(model(x), y))
    assert torch.equal(supervised_forward(model, (x, y)), model(x))
    assert int(lf.batch_weight((x, y))) == 4  # type: ignore[attr-defined]
    per_sample = supervised_loss(nn.CrossEntropyLoss(reduction="none"))
    assert per_sample(model, (x, y)).shape == (6,)
    assert not hasattr(per_sample, "batch_weight")
    ce = cross_entropy_loss_of_output()
    lo = supervised_loss(ce)
    assert torch.equal(lo(model, (x, y)), ce(model(x), (x, y)))
    assert supervised_loss(nn.MSELoss()).batch_weight((x, torch.zeros(6, 4))) == 24  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"\(x, y\) tuple"):
        supervised_forward(model, {"x": x})
    with pytest.raises(TypeError, match="callable"):
        supervised_loss(3)  # type: ignore[arg-type]


def test_user_loss_with_attached_hvp() -> None:
    """The public loss_of_output attaches a closed form to a user's own loss."""

    def hvp(output: torch.Tensor, batch: Any, u: torch.Tensor) -> torch.Tensor:
        return 2 * u * batch[1] / output.shape[0]

    @loss_of_output(hvp=hvp)
    def weighted_sq(output: torch.Tensor, batch: Any) -> torch.Tensor:
        return (batch[1] * output**2).sum() / output.shape[0]

    assert isinstance(weighted_sq, LossOfOutput) and weighted_sq.has_hvp
    o = torch.randn(5, dtype=torch.float64)
    c = torch.rand(5, dtype=torch.float64)
    u = torch.randn(5, dtype=torch.float64)
    want = jvp(grad(lambda oo: weighted_sq(oo, (None, c))), (o,), (u,))[1]
    assert rel_err(weighted_sq.hvp(o, (None, c), u), want) <= 1e-15

"""Parameter filters and flat-vector helpers for per-layer work.

- A submodule (or a list of submodules / parameters) is a filter of its parameters, by
  identity; the operator built with it equals the dense float64 Hessian block of those
  parameters (an independent oracle from ``torch.func``).
- ``unflatten`` accepts an operator; ``ParamLayout.split`` gives ``{name: piece}``.
- Everything else gets a TypeError / ValueError that says what was expected.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hessian_eigenthings import HessianOperator, LambdaOperator, unflatten
from hessian_eigenthings.param_utils import (
    ParamLayout,
    as_param_filter,
    match_params,
    match_regex,
    select_params,
)


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def dense_block_hessian(model: nn.Module, names: list[str]) -> torch.Tensor:
    """Dense float64 Hessian of the sample-weighted mean loss w.r.t. ``names``."""
    params = dict(model.named_parameters())
    data = batches()
    n_total = sum(b[1].shape[0] for b in data)
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss_of_flat(theta: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(theta, [s.numel() for s in shapes])
        override = {n: t.view(s) for n, t, s in zip(names, pieces, shapes)}
        total = torch.zeros((), dtype=torch.float64)
        for x, y in data:
            logits = torch.func.functional_call(model, {**params, **override}, (x,))
            total = total + nn.functional.cross_entropy(logits, y, reduction="sum")
        return total / n_total

    return torch.autograd.functional.hessian(loss_of_flat, flat)


def dense_of(op: Any) -> torch.Tensor:
    eye = torch.eye(op.size, dtype=torch.float64)
    return torch.stack([op.matvec(eye[i]) for i in range(op.size)], dim=1)


# -- a submodule as a filter ------------------------------------------------------------


def test_module_filter_selects_its_parameters_by_identity() -> None:
    model = small_cnn()
    chosen = select_params(model, model[0])
    assert [n for n, _ in chosen] == ["0.weight", "0.bias"]
    assert all(p is q for (_, p), q in zip(chosen, model[0].parameters()))


def test_module_filter_operator_matches_dense_block() -> None:
    model = small_cnn()
    H = HessianOperator(model, batches(), loss_fn, param_filter=model[0])
    assert H.size == 2 * 9 + 2
    expected = dense_block_hessian(model, ["0.weight", "0.bias"])
    torch.testing.assert_close(dense_of(H), expected, rtol=1e-10, atol=1e-12)


def test_list_of_modules_and_parameters_is_a_filter() -> None:
    model = small_cnn()
    chosen = select_params(model, [model[3], model[0].bias])
    assert [n for n, _ in chosen] == ["0.bias", "3.weight", "3.bias"]
    # identity filters compose with the name filters
    chosen = select_params(model, match_regex(r"weight$") & model[3])
    assert [n for n, _ in chosen] == ["3.weight"]
    assert [n for n, _ in select_params(model, match_params(model[0], model[3].bias))] == [
        "0.weight",
        "0.bias",
        "3.bias",
    ]


def test_module_filter_of_another_model_says_so() -> None:
    model, other = small_cnn(), small_cnn()
    with pytest.raises(ValueError, match="not parameters of this model"):
        select_params(model, other[0])


def test_module_without_parameters_is_rejected() -> None:
    model = small_cnn()
    with pytest.raises(ValueError, match="without parameters"):
        as_param_filter(model[1])


@pytest.mark.parametrize(
    "spec, message",
    [
        (3.5, "got float"),
        ([1, 2], r"got list of \['int'\]"),
        ([], "got empty list"),
        (torch.zeros(3), "got Tensor"),
        (["0.weight", 3], r"got list of \['int', 'str'\]"),
    ],
)
def test_non_filters_get_a_clear_type_error(spec: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message) as exc:
        as_param_filter(spec)
    assert "submodule" in str(exc.value)


def test_callable_with_wrong_signature_is_rejected_at_construction() -> None:
    model = small_cnn()
    with pytest.raises(TypeError, match=r"callable but not a filter.*\(name: str, param"):
        HessianOperator(model, batches(), loss_fn, param_filter=lambda name: "bias" in name)
    # a proper predicate still works
    chosen = select_params(model, lambda name, p: name.endswith("bias"))
    assert [n for n, _ in chosen] == ["0.bias", "3.bias"]


# -- flat vectors back to parameters ----------------------------------------------------


def test_unflatten_accepts_an_operator() -> None:
    model = small_cnn()
    H = HessianOperator(model, batches(), loss_fn, param_filter=model[3])
    vec = torch.arange(H.size, dtype=torch.float64)
    pieces = unflatten(vec, H)
    assert [t.shape for t in pieces] == [model[3].weight.shape, model[3].bias.shape]
    assert torch.equal(torch.cat([t.reshape(-1) for t in pieces]), vec)
    assert all(torch.equal(a, b) for a, b in zip(pieces, unflatten(vec, H.params)))


def test_layout_split_gives_named_views() -> None:
    model = small_cnn()
    H = HessianOperator(model, batches(), loss_fn)
    vec = torch.randn(H.size, dtype=torch.float32)
    parts = H.layout.split(vec)
    assert list(parts) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert parts[name].shape == p.shape
        assert parts[name].dtype == torch.float32  # no cast: exact pieces of vec
    # views: the same storage, in order
    assert torch.equal(torch.cat([t.reshape(-1) for t in parts.values()]), vec)
    parts["3.bias"][0] = 123.0
    assert vec[-3] == 123.0


def test_layout_split_rejects_wrong_sizes() -> None:
    layout = ParamLayout.of([("a", torch.zeros(2, 3)), ("b", torch.zeros(4))])
    with pytest.raises(ValueError, match=r"size 10 .* got shape \(9,\)"):
        layout.split(torch.zeros(9))
    with pytest.raises(ValueError, match=r"got shape \(2, 5\)"):
        layout.split(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="flat torch.Tensor"):
        layout.split([0.0] * 10)  # type: ignore[arg-type]


def test_unflatten_rejects_models_and_operators_without_params() -> None:
    model = small_cnn()
    vec = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with pytest.raises(TypeError, match=r"Pass the operator"):
        unflatten(vec, model)
    op = LambdaOperator(lambda v: v, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="LambdaOperator"):
        unflatten(torch.zeros(4, dtype=torch.float64), op)
    with pytest.raises(TypeError, match="single tensor"):
        unflatten(torch.zeros(4), torch.zeros(4))
    with pytest.raises(TypeError, match=r"must hold tensors, got \['str'\]"):
        unflatten(torch.zeros(4), ["a"])

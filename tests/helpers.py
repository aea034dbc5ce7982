"""Independent oracles for tests: dense float64 matrices built with torch.func."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def param_dict(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    names = list(names) if names is not None else [n for n, p in named.items() if p.requires_grad]
    return {n: named[n].detach() for n in names}


def mean_loss_fn(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    names: Sequence[str],
    weight: Callable[[Any], int] = lambda b: int(b[0].shape[0]),
) -> Callable[[torch.Tensor], torch.Tensor]:
    """theta_flat -> sample-weighted mean loss over all batches (functional, float64)."""
    base = param_dict(model, names)
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]
    total = sum(weight(b) for b in batches)

    class _Proxy(nn.Module):
        def __init__(self, params: dict[str, torch.Tensor]) -> None:
            super().__init__()
            self._params = params

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return functional_call(model, self._params, args, kwargs)

        def __getattr__(self, item: str) -> Any:
            try:
                return super().__getattr__(item)
            except AttributeError:
                return getattr(model, item)

    def f(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, sizes)
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes)}
        proxy = _Proxy(params)
        return sum(weight(b) * loss_fn(proxy, b) for b in batches) / total  # type: ignore[return-value]

    return f


def dense_hessian(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    names: Sequence[str] | None = None,
    weight: Callable[[Any], int] = lambda b: int(b[0].shape[0]),
) -> torch.Tensor:
    """Dense Hessian of the sample-weighted mean loss, by torch.autograd.functional."""
    names = list(names) if names is not None else list(param_dict(model))
    f = mean_loss_fn(model, batches, loss_fn, names, weight)
    flat = torch.cat([param_dict(model, names)[n].reshape(-1) for n in names])
    return torch.autograd.functional.hessian(f, flat)


def fd_hvp(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    v: torch.Tensor,
    names: Sequence[str] | None = None,
    h: float = 1e-3,
    weight: Callable[[Any], int] = lambda b: int(b[0].shape[0]),
) -> torch.Tensor:
    """4-point finite difference of exact (first-order) gradients along v; no 2nd-order AD.

    H v ~ [-g(t+2hu) + 8 g(t+hu) - 8 g(t-hu) + g(t-2hu)] / (12 h) * |v|, error O(h^4).
    """
    names = list(names) if names is not None else list(param_dict(model))
    f = mean_loss_fn(model, batches, loss_fn, names, weight)
    flat = torch.cat([param_dict(model, names)[n].reshape(-1) for n in names])
    nv = v.norm()
    u = v / nv

    def g(s: float) -> torch.Tensor:
        x = (flat + s * h * u).detach().requires_grad_(True)
        return torch.autograd.grad(f(x), x)[0]

    return (-g(2) + 8 * g(1) - 8 * g(-1) + g(-2)) / (12 * h) * nv


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about a model that an operator must leave untouched."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {
            n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()
        },
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, snap: dict[str, Any]) -> None:
    now = snapshot(model)
    for n, p in now["params"].items():
        assert torch.equal(p, snap["params"][n]), f"parameter {n} changed"
    assert now["requires_grad"] == snap["requires_grad"]
    for n, g in now["grads"].items():
        before = snap["grads"][n]
        assert (g is None) == (before is None), f".grad of {n} changed"
        if g is not None:
            assert torch.equal(g, before), f".grad of {n} changed"
    for n, b in now["buffers"].items():
        assert torch.equal(b, snap["buffers"][n]), f"buffer {n} changed"
    assert now["training"] == snap["training"]

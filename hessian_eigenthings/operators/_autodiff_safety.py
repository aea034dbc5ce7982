"""Make second-order and forward-mode autodiff through common layers exact.

PyTorch kernels are not all twice differentiable on every device and version:
the fused scaled-dot-product-attention kernels (flash, memory-efficient, and CPU's
flash path) implement no double backward and no forward-mode AD, and normalisation
double-backward formulas have been wrong in some releases. The computations that
differentiate twice or in forward mode (the Hessian's double backward, the exact
Jacobian-vector product of the GGN and Fishers) run inside :func:`curvature_mode`, which

1. selects the math SDPA backend (differentiable to any order) and restores the user's
   backend selection on exit;
2. probes, once per (device type, dtype), the double backward of ``layer_norm``,
   ``batch_norm`` (train mode) and ``group_norm`` in the model's dtype (the kernels a
   float32 or bfloat16 model runs, which are not those of float64) against decomposed
   reference implementations made of elementwise ops and reductions; any op whose
   built-in Hessian-vector product is clearly less accurate than the decomposition in
   the same dtype (or raises) is routed through its decomposition for the duration of
   the block, with a log line naming it.

Nothing else runs in it: first-order passes (finite differences, the ordinary forward
and reverse pass of the GGN and Fishers, FSDP2 products, the determinism probe) keep the
user's attention kernels, whose memory is linear in the sequence length (the math
kernel stores the ``T x T`` attention matrix of every head and layer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["curvature_mode", "decomposed_ops", "probe_second_order"]

logger = logging.getLogger("hessian_eigenthings")


def _layer_norm(
    x: torch.Tensor,
    normalized_shape: Any,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the trailing dims."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch norm from reductions; updates running stats like the built-in in train mode."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training or running_mean is None or running_var is None:
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
        if training and running_mean is not None and running_var is not None:
            count = x.numel() // x.shape[1]
            with torch.no_grad():
                m = 0.1 if momentum is None else momentum
                unbiased = var.reshape(-1) * count / max(count - 1, 1)
                running_mean.mul_(1 - m).add_(mean.reshape(-1).to(running_mean.dtype), alpha=m)
                running_var.mul_(1 - m).add_(unbiased.to(running_var.dtype), alpha=m)
    else:
        mean = running_mean.reshape(shape)
        var = running_var.reshape(shape)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Group norm from reductions over ``(C / G) * spatial`` entries per group."""
    n, c = x.shape[:2]
    xr = x.reshape(n, num_groups, -1)
    mean = xr.mean(-1, keepdim=True)
    var = (xr - mean).square().mean(-1, keepdim=True)
    y = ((xr - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = [1, c] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


_DECOMPOSED: dict[Callable[..., Any], Callable[..., Any]] = {
    F.layer_norm: _layer_norm,
    F.batch_norm: _batch_norm,
    F.group_norm: _group_norm,
}


_DECOMPOSED_BY_NAME = {k.__name__: v for k, v in _DECOMPOSED.items()}


def decomposed_ops() -> dict[str, Callable[..., Any]]:
    """Name -> decomposed reference implementation (for tests and docs)."""
    return {k.__name__: v for k, v in _DECOMPOSED.items()}


def _probe_inputs(
    name: str, dtype: torch.dtype, device: torch.device
) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator(device="cpu").manual_seed(1234)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    if name == "layer_norm":
        return (lambda fn, x, w, b: fn(x, (6,), w, b)), [r(3, 4, 6), r(6), r(6)]
    if name == "batch_norm":
        rm, rv = (
            torch.zeros(3, dtype=dtype, device=device),
            torch.ones(3, dtype=dtype, device=device),
        )
        return (lambda fn, x, w, b: fn(x, rm.clone(), rv.clone(), w, b, True)), [
            r(5, 3, 4),
            r(3),
            r(3),
        ]
    return (lambda fn, x, w, b: fn(x, 3, w, b)), [r(4, 6, 5), r(6), r(6)]


def _hvp_of(
    fn: Callable[..., torch.Tensor],
    call: Callable[..., torch.Tensor],
    inputs: list[torch.Tensor],
    weights: torch.Tensor,
    direction: list[torch.Tensor],
) -> torch.Tensor:
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.enable_grad():  # the probe may first run inside the caller's no_grad()
        loss = (weights * call(fn, *xs).square()).sum()
        grads = torch.autograd.grad(loss, xs, create_graph=True)
        dot = torch.stack([(g * d).sum() for g, d in zip(grads, direction)]).sum()
        hv = torch.autograd.grad(dot, xs)
    return torch.cat([h.reshape(-1) for h in hv])


_PROBE_CACHE: dict[tuple[str, torch.dtype], frozenset[Callable[..., Any]]] = {}


def _hvp_in(
    fn: Callable[..., torch.Tensor], name: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The probe problem of op ``name`` (fixed seeds, rounded to ``dtype``): ``fn``'s HVP."""
    call, inputs = _probe_inputs(name, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(99)
    direction = [
        torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device, dtype) for t in inputs
    ]
    out_shape = call(_DECOMPOSED_BY_NAME[name], *inputs).shape
    weights = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(device, dtype)
    return _hvp_of(fn, call, inputs, weights, direction)


def _relative_error(
    fn: Callable[..., torch.Tensor],
    name: str,
    dtype: torch.dtype,
    device: torch.device,
    want: torch.Tensor,
) -> float:
    """``||HVP_fn - want|| / ||want||`` with ``fn``'s HVP computed in ``dtype`` (inf: raised)."""
    try:
        got = _hvp_in(fn, name, dtype, device)
    except (RuntimeError, NotImplementedError):
        return float("inf")
    return float((got.to(want.dtype) - want).norm() / want.norm())


def probe_second_order(dtype: torch.dtype, device: torch.device) -> frozenset[Callable[..., Any]]:
    """Built-in ops whose double backward is wrong or missing on ``(device, dtype)``.

    On a small random problem, each op's Hessian-vector product is computed in
    ``dtype`` (the kernels a model of that dtype runs) by the built-in op and by its
    decomposition, and both are compared with the decomposition's product in float64
    (float32 on devices without float64). The built-in is broken if it raises, or if its
    relative error exceeds ``max(floor, 4 x`` the decomposition's error``)``: rounding
    of the dtype affects both alike, a wrong formula only the built-in. ``floor`` is
    ``1e-8`` in float64 and ``sqrt(eps)`` otherwise (float32: 3.5e-4, bfloat16: 0.088).
    Cached per (device type, dtype).
    """
    key = (device.type, dtype)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    ref_dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
    floor = 1e-8 if dtype == torch.float64 else float(torch.finfo(dtype).eps) ** 0.5
    broken = set()
    for builtin, reference in _DECOMPOSED.items():
        name = builtin.__name__
        want = _hvp_in(reference, name, ref_dtype, device)
        err_builtin = _relative_error(builtin, name, dtype, device, want)
        err_decomposed = (
            0.0 if dtype == ref_dtype else _relative_error(reference, name, dtype, device, want)
        )
        ok = err_builtin <= max(floor, 4.0 * err_decomposed)
        if not ok:
            broken.add(builtin)
            logger.info(
                "hessian_eigenthings: torch %s's double backward of %s is wrong or missing on %s; "
                "curvature computations use a decomposed implementation instead.",
                torch.__version__,
                builtin.__name__,
                device.type,
            )
    result = frozenset(broken)
    _PROBE_CACHE[key] = result
    return result


class _RouteOps(TorchFunctionMode):
    """Redirect selected ``torch.nn.functional`` calls to their decompositions."""

    def __init__(self, ops: frozenset[Callable[..., Any]]) -> None:
        super().__init__()
        self._ops = {op: _DECOMPOSED[op] for op in ops}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        target = self._ops.get(func)
        if target is not None:
            return target(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


_LOGGED_SDPA = False


@contextmanager
def curvature_mode(
    device: torch.device, dtype: torch.dtype, *, force_decomposed: bool = False
) -> Iterator[None]:
    """Context in which double backward and forward-mode AD through the model are exact.

    Args:
        device: Device of the model.
        dtype: Dtype of the model: the normalisation probes run in it.
        force_decomposed: Route every op with a decomposition through it, whatever the
            probe says (used in tests of the routing itself).
    """
    global _LOGGED_SDPA
    with ExitStack() as stack:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if not _LOGGED_SDPA:
            logger.info(
                "hessian_eigenthings: using the math scaled_dot_product_attention backend during "
                "curvature computations (fused kernels have no double backward / forward AD)."
            )
            _LOGGED_SDPA = True
        routed = frozenset(_DECOMPOSED) if force_decomposed else probe_second_order(dtype, device)
        if routed:
            stack.enter_context(_RouteOps(routed))
        yield

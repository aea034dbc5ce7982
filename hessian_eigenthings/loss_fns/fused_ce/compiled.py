"""The cross-entropy HVP as one ``torch.compile`` (fullgraph) graph.

Same mathematics as :func:`~hessian_eigenthings.loss_fns.fused_ce.reference.ce_hvp_eager`;
Inductor fuses the softmax, the row dot product and the output into a few loops over the
vocabulary, so no float32 copy of the ``(N, V)`` logits or of ``p`` is kept in memory.
Compiled once with dynamic shapes (``N`` and ``V`` may vary without recompiling); the
normaliser is passed as a tensor so that changing token counts do not recompile either.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch

from hessian_eigenthings.loss_fns.fused_ce._common import check_inputs, normaliser

__all__ = ["ce_hvp_compiled", "compile_error"]


def _hvp_body(
    logits: torch.Tensor, target: torch.Tensor, u: torch.Tensor, n: torch.Tensor, ignore: int
) -> torch.Tensor:
    acc = torch.float64 if torch.float64 in (logits.dtype, u.dtype) else torch.float32
    p = torch.softmax(logits.to(acc), dim=-1)
    pu = p * u.to(acc)
    dot = pu.sum(-1, keepdim=True)
    weight = (target != ignore).to(acc).unsqueeze(-1) / n.to(acc).clamp_min(1)
    return ((pu - p * dot) * weight).to(torch.promote_types(logits.dtype, u.dtype))


@functools.cache
def _compiled(key: tuple[torch.dtype, torch.dtype, int, bool]) -> Callable[..., torch.Tensor]:
    """One compiled function per (logits dtype, u dtype, rank, unit vocab stride).

    Dynamo caches graphs per *code object* and stops recompiling after
    ``torch._dynamo.config.recompile_limit`` (8) variants, a hard error under
    ``fullgraph=True``. Each key therefore gets its own copy of the body's code object, so
    mixing dtypes, ranks and layouts in one process cannot exhaust a shared limit (shapes
    are dynamic; small and large vocabularies compile two variants per key).
    """
    name = "_hvp_body_" + "_".join(str(k).replace("torch.", "") for k in key)
    code = _hvp_body.__code__.replace(co_name=name)
    body = types.FunctionType(code, _hvp_body.__globals__, name)
    return torch.compile(body, fullgraph=True, dynamic=True)


def _run(
    logits: torch.Tensor, target: torch.Tensor, u: torch.Tensor, n: torch.Tensor, ignore: int
) -> torch.Tensor:
    unit = logits.stride(-1) == 1 and u.stride(-1) == 1
    fn = _compiled((logits.dtype, u.dtype, logits.dim(), unit))
    return fn(logits, target, u, n, ignore)


_ERRORS: dict[str, Exception | None] = {}


def compile_error(device: torch.device) -> Exception | None:
    """Why ``torch.compile`` cannot run the kernel on ``device`` (``None`` if it can).

    Compiles and runs a tiny problem once per device type (cached), e.g. to detect a
    missing C++ compiler on CPU or an unsupported device.
    """
    key = device.type
    if key not in _ERRORS:
        try:
            z = torch.zeros(2, 3, device=device)
            t = torch.zeros(2, dtype=torch.long, device=device)
            _run(z, t, z, torch.ones((), dtype=torch.long, device=device), -100)
            _ERRORS[key] = None
        except Exception as err:  # any backend failure means "cannot run here"
            _ERRORS[key] = err
    return _ERRORS[key]


def ce_hvp_compiled(
    logits: torch.Tensor,
    target: torch.Tensor,
    u: torch.Tensor,
    *,
    ignore_index: int = -100,
    n_valid: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``H u`` for the mean cross entropy over non-ignored rows, via ``torch.compile``.

    Arguments and result as in
    :func:`~hessian_eigenthings.loss_fns.fused_ce.reference.ce_hvp_eager`.

    Raises:
        RuntimeError: ``torch.compile`` cannot run on this device (the message holds the
            compiler's error and the remedy).
    """
    check_inputs(logits, target, u)
    err = compile_error(logits.device)
    if err is not None:
        raise RuntimeError(
            f"fused='compile' cannot run on {logits.device.type}: torch.compile failed with "
            f"{type(err).__name__}: {err}. Use fused='eager' (or 'auto', which falls back)."
        ) from err
    n_t = normaliser(n_valid, target, ignore_index, logits.device)
    if logits.dim() != 2:
        # one compiled graph for every rank: rows x vocab (views only, never a copy)
        try:
            shape = logits.shape
            flat = (logits.view(-1, shape[-1]), target.view(-1), u.view(-1, shape[-1]))
        except RuntimeError:
            return _run(logits, target, u, n_t, ignore_index)
        return _run(*flat, n_t, ignore_index).view(shape)
    return _run(logits, target, u, n_t, ignore_index)

"""Choose a cross-entropy HVP backend: ``"auto"`` falls back honestly, explicit choices fail loudly.

``"auto"`` picks, for the device of the logits,

1. ``"triton"`` on CUDA when Triton is installed (the hand-written two-pass kernel),
2. else ``"compile"`` when ``torch.compile`` works on the device (probed once),
3. else ``"eager"`` (the reference),

and logs its choice once per device type (logger ``hessian_eigenthings``), with the
reason for every backend it passed over. An explicit ``"triton"`` or ``"compile"`` that
cannot run raises ``RuntimeError`` saying why; nothing falls back silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from hessian_eigenthings.loss_fns.fused_ce.compiled import ce_hvp_compiled, compile_error
from hessian_eigenthings.loss_fns.fused_ce.reference import ce_hvp_eager
from hessian_eigenthings.loss_fns.fused_ce.triton_kernel import (
    ce_hvp_triton,
    triton_unavailable_reason,
)

__all__ = ["BACKENDS", "fused_ce_hvp", "resolve_backend"]

logger = logging.getLogger("hessian_eigenthings")

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": ce_hvp_eager,
    "compile": ce_hvp_compiled,
    "triton": ce_hvp_triton,
}
_CHOICES = ("auto", *BACKENDS)
_LOGGED: set[str] = set()


def _check_name(backend: str) -> None:
    if backend not in _CHOICES:
        raise ValueError(f"Unknown fused CE-HVP backend {backend!r}; expected one of {_CHOICES}.")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` means on ``device``.

    Args:
        backend: ``"auto"``, ``"eager"``, ``"compile"`` or ``"triton"``.
        device: Device of the logits.

    Returns:
        A concrete backend name.

    Raises:
        ValueError: Unknown name.
        RuntimeError: An explicitly requested backend cannot run on ``device``.
    """
    _check_name(backend)
    device = torch.device(device)
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"fused='triton' cannot run: {reason} Use fused='auto'.")
        return backend
    if backend == "compile":
        err = compile_error(device)
        if err is not None:
            raise RuntimeError(
                f"fused='compile' cannot run on {device.type}: torch.compile failed with "
                f"{type(err).__name__}: {err}. Use fused='eager' or 'auto'."
            ) from err
        return backend
    if backend == "eager":
        return backend
    skipped = []
    choice = "eager"
    reason = triton_unavailable_reason(device) if device.type == "cuda" else "not a CUDA device"
    if reason is None:
        choice = "triton"
    else:
        skipped.append(f"triton: {reason}")
        err = compile_error(device)
        if err is None:
            choice = "compile"
        else:
            skipped.append(f"compile: {type(err).__name__}: {err}")
    if device.type not in _LOGGED:
        _LOGGED.add(device.type)
        logger.info(
            "hessian_eigenthings: fused cross-entropy HVP on %s uses backend %r%s",
            device.type,
            choice,
            f" (passed over {'; '.join(skipped)})" if skipped else "",
        )
    return choice


def fused_ce_hvp(
    logits: torch.Tensor,
    target: torch.Tensor,
    u: torch.Tensor,
    *,
    ignore_index: int = -100,
    n_valid: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""``H u`` for the mean cross entropy over non-ignored rows, on the chosen backend.

    .. math::

        (H u)_r = \frac{[y_r \ne \text{ignore}]}{n}\,
        \big(p_r \odot u_r - p_r \langle p_r, u_r \rangle\big),
        \qquad p_r = \operatorname{softmax}(z_r).

    The result is a value, not part of an autograd graph (computed under ``no_grad``).

    Args:
        logits: ``(..., V)`` logits (float16/bfloat16/float32/float64, any strides).
        target: ``(...)`` integer targets.
        u: ``(..., V)`` direction in logit space.
        ignore_index: Target value of ignored rows (they get zeros).
        n_valid: Normaliser (default: number of non-ignored rows; int or 0-d tensor).
        backend: ``"auto"``, ``"eager"``, ``"compile"`` or ``"triton"``.

    Returns:
        ``H u`` shaped like ``logits`` in dtype ``promote(logits.dtype, u.dtype)``.

    Example:
        >>> z, u = torch.randn(4, 10), torch.randn(4, 10)
        >>> y = torch.tensor([1, 2, -100, 3])
        >>> fused_ce_hvp(z, y, u, backend="eager").shape
        torch.Size([4, 10])
    """
    name = resolve_backend(backend, logits.device)
    with torch.no_grad():
        return BACKENDS[name](logits, target, u, ignore_index=ignore_index, n_valid=n_valid)

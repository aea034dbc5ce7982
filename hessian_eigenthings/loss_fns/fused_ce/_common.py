"""Argument checks and shared helpers of the fused cross-entropy HVP backends."""

from __future__ import annotations

import torch

__all__ = ["check_inputs", "count_valid", "normaliser", "result_dtype"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(logits: torch.Tensor, target: torch.Tensor, u: torch.Tensor) -> None:
    """Validate shapes, dtypes and devices of ``(logits, target, u)``.

    Raises:
        ValueError: Shapes or devices disagree.
        TypeError: Non-floating logits / direction, or non-integer targets.
    """
    if logits.dim() < 1:
        raise ValueError("logits must have a trailing vocabulary dimension, got a 0-d tensor.")
    if logits.dtype not in _FLOATS or u.dtype not in _FLOATS:
        raise TypeError(
            f"logits and u must be float16/bfloat16/float32/float64, got {logits.dtype} and "
            f"{u.dtype}."
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}.")
    if u.shape != logits.shape:
        raise ValueError(
            f"u must have the shape of logits {tuple(logits.shape)}, got {tuple(u.shape)}."
        )
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got "
            f"{tuple(target.shape)}."
        )
    if not (logits.device == u.device == target.device):
        raise ValueError(
            f"logits, target and u must be on one device, got {logits.device}, {target.device} "
            f"and {u.device}."
        )


def count_valid(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of non-ignored rows as an int64 0-d tensor on the target's device (no sync)."""
    return (target != ignore_index).sum()


def normaliser(
    n_valid: int | float | torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    device: torch.device,
) -> torch.Tensor:
    """The normaliser ``n`` as a 0-d tensor on ``device``, without a host synchronisation.

    ``None`` counts the non-ignored targets on the device; a Python number becomes a
    device-side fill (``torch.full``: a kernel argument, not a host-to-device copy from
    pageable memory, which would wait for the stream); a tensor is moved if it lives
    elsewhere (a 0-d host tensor costs one small copy: keep counts on the device).
    """
    if n_valid is None:
        return count_valid(target, ignore_index)
    if isinstance(n_valid, torch.Tensor):
        if n_valid.numel() != 1:
            raise ValueError(
                f"n_valid must be a number or a 1-element tensor, got shape {tuple(n_valid.shape)}."
            )
        return n_valid.reshape(()).to(device)
    if isinstance(n_valid, bool) or not isinstance(n_valid, (int, float)):
        raise TypeError(
            f"n_valid must be an int, a float or a 0-d tensor, got {type(n_valid).__name__}."
        )
    dtype = torch.int64 if isinstance(n_valid, int) else torch.float64
    if device.type == "mps" and dtype == torch.float64:
        dtype = torch.float32
    return torch.full((), n_valid, dtype=dtype, device=device)


def result_dtype(logits: torch.Tensor, u: torch.Tensor) -> torch.dtype:
    """Dtype of ``H u``: the promotion of the logits and direction dtypes."""
    return torch.promote_types(logits.dtype, u.dtype)

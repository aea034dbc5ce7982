r"""Hand-written Triton kernel for the cross-entropy HVP, two passes over the vocabulary.

One program per row ``r`` (a token) computes

.. math::

    (H u)_r = \frac{m_r}{n} \big(p_r \odot u_r - p_r \langle p_r, u_r \rangle\big),
    \qquad p_r = \operatorname{softmax}(z_r),

(see :mod:`~hessian_eigenthings.loss_fns.fused_ce.reference`) without materialising
``p``:

* pass 1 streams the row in blocks of ``BLOCK`` columns and keeps three running
  scalars, the maximum :math:`M`, the rescaled normaliser :math:`S = \sum_j e^{z_j - M}`
  and the rescaled dot :math:`D = \sum_j e^{z_j - M} u_j`; when the maximum grows from
  :math:`M` to :math:`M'` both are multiplied by :math:`e^{M - M'}` (the online softmax of
  Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018). At the end
  :math:`\langle p, u \rangle = D / S`.
* pass 2 streams the row again and writes :math:`p_j (u_j - D/S) \cdot m_r / n` with
  :math:`p_j = e^{z_j - M} / S` straight into the output.

Memory traffic per row: pass 1 reads ``z`` and ``u`` (2V elements), pass 2 reads them
again and writes the output (3V): 5V elements in total, against at least 8V for the
eager reference (softmax, product, reduction and output each re-read or write ``(N, V)``
in float32). Accumulation is float32 (float64 for float64 inputs); inputs may be
float16, bfloat16, float32 or float64 and any strides (no contiguous copies); offsets are
int64 so ``N * V`` may exceed 2**31; ignored rows write zeros; the normaliser ``n`` is
read from device memory, so a call never synchronises with the host.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter; slow, meant for tests). The variable must be set before the process first
imports Triton (Triton builds its standard library for the interpreter or the GPU at
import); the kernel itself is jitted at first launch.
"""

import functools
import os
from typing import Any

import torch

from hessian_eigenthings.loss_fns.fused_ce._common import check_inputs, count_valid, result_dtype

__all__ = ["DEFAULT_BLOCK", "ce_hvp_triton", "triton_unavailable_reason"]

DEFAULT_BLOCK = 4096


@functools.cache
def _triton() -> Any:
    """The ``triton`` module, imported on first use (``None`` if not installed).

    Imported lazily so that ``import hessian_eigenthings`` neither pays Triton's import
    time nor fixes Triton's interpreter mode before the user sets ``TRITON_INTERPRET``.
    """
    try:
        import triton
        import triton.language
    except ImportError:  # optional dependency (extra "triton")
        return None
    return triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _stdlib_interpreted() -> bool:
    """Whether Triton's jitted standard library was built for the interpreter.

    Triton decides this when ``triton.language`` is first imported, from
    ``TRITON_INTERPRET`` at that moment.
    """
    return type(_triton().language.standard.sum).__name__ == "InterpretedFunction"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on ``device`` (``None`` if it can)."""
    if _triton() is None:
        return "triton is not installed; install it with `pip install hessian-eigenthings[triton]`."
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        if not _stdlib_interpreted():
            return (
                "TRITON_INTERPRET=1 was set after triton was imported, so Triton's standard "
                "library (tl.sum, tl.max) was compiled for GPUs. Set TRITON_INTERPRET=1 in the "
                "environment before the process imports triton (or torch.compile)."
            )
        return None
    return (
        f"the Triton kernel runs on CUDA tensors, got a {device.type} tensor. Set "
        "TRITON_INTERPRET=1 to run it on CPU through Triton's interpreter (slow; for tests)."
    )


_KERNELS: dict[bool, Any] = {}


def _kernel() -> Any:
    """The jitted kernel; built at first launch so TRITON_INTERPRET is read then."""
    interpret = _interpreting()
    if interpret not in _KERNELS:
        from hessian_eigenthings.loss_fns.fused_ce._triton_rows import ce_hvp_rows

        _KERNELS[interpret] = _triton().jit(ce_hvp_rows)
    return _KERNELS[interpret]


def _rows3(x: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """View ``(..., V)`` as ``(B, T, V)`` strides without copying."""
    if x.dim() == 1:
        return x, (0, 0, x.stride(0))
    if x.dim() == 2:
        return x, (x.stride(0), 0, x.stride(1))
    if x.dim() == 3:
        return x, (x.stride(0), x.stride(1), x.stride(2))
    try:
        v = x.view(-1, x.shape[-2], x.shape[-1])
    except RuntimeError as err:
        raise ValueError(
            f"{name} with {x.dim()} dims and strides {x.stride()} cannot be viewed as "
            "(batch, tokens, vocab) without a copy; reshape it to 3 dims first."
        ) from err
    return v, (v.stride(0), v.stride(1), v.stride(2))


def _target_strides(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if t.dim() == 0:
        return t, 0, 0
    if t.dim() == 1:
        return t, t.stride(0), 0
    if t.dim() == 2:
        return t, t.stride(0), t.stride(1)
    try:
        v = t.view(-1, t.shape[-1])
    except RuntimeError as err:
        raise ValueError(
            f"target with strides {t.stride()} cannot be viewed as (batch, tokens) without a "
            "copy; reshape it first."
        ) from err
    return v, v.stride(0), v.stride(1)


def ce_hvp_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    u: torch.Tensor,
    *,
    ignore_index: int = -100,
    n_valid: int | torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """``H u`` for the mean cross entropy over non-ignored rows, by the Triton kernel.

    Same result as :func:`~hessian_eigenthings.loss_fns.fused_ce.reference.ce_hvp_eager`.

    Args:
        logits: ``(..., V)`` logits, any strides (read in place).
        target: ``(...)`` integer targets; ``ignore_index`` rows get zeros.
        u: ``(..., V)`` direction, any strides.
        ignore_index: Target value of ignored rows.
        n_valid: Normaliser (int or 0-d tensor; default: number of non-ignored rows). Read
            by the kernel from device memory, so no host synchronisation.
        block_size: Vocabulary columns per step (a power of two; default 4096). Rows
            longer than the block are streamed in several steps.

    Raises:
        RuntimeError: Triton is missing or cannot run on this device (message says why).
        ValueError: ``block_size`` is not a power of two.
    """
    check_inputs(logits, target, u)
    reason = triton_unavailable_reason(logits.device)
    if reason is not None:
        raise RuntimeError(f"fused='triton' cannot run: {reason}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}.")
    vocab = logits.shape[-1]
    out = torch.empty(logits.shape, dtype=result_dtype(logits, u), device=logits.device)
    rows = out.numel() // max(vocab, 1)
    if rows == 0 or vocab == 0:
        return out.zero_()
    z3, zs = _rows3(logits, "logits")
    u3, us = _rows3(u, "u")
    o3, os_ = _rows3(out, "out")
    t2, tsb, tst = _target_strides(target)
    tokens = z3.shape[1] if logits.dim() >= 3 else 1
    n = count_valid(target, ignore_index) if n_valid is None else n_valid
    n_t = torch.as_tensor(n, device=logits.device).reshape(())
    if n_t.dtype.is_floating_point:
        n_t = n_t.to(torch.float64 if torch.float64 in (logits.dtype, u.dtype) else torch.float32)
    tl = _triton().language
    acc = tl.float64 if torch.float64 in (logits.dtype, u.dtype) else tl.float32
    block = min(block_size, 1 << (vocab - 1).bit_length())
    _kernel()[(rows,)](
        z3,
        u3,
        t2,
        o3,
        n_t,
        tokens,
        vocab,
        *zs,
        *us,
        tsb,
        tst,
        *os_,
        ignore_index,
        BLOCK=block,
        ACC=acc,
    )
    return out

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

Memory traffic (elements of the row, DRAM unless L2 still holds the row): a valid row
costs 5V, pass 1 reads ``z`` and ``u`` (2V) and pass 2 reads them again and writes the
output (3V); an ignored row costs V, zeros written, nothing read. The compulsory traffic is
3V per valid row (read each input once, write once); the 2V of re-reads are the price of
not holding a row on chip (a GPT-2 row of ``z`` and ``u`` in bfloat16 is 200 kB, more
than a streaming multiprocessor's shared memory). The eager reference moves at least 8V
(softmax, product, reduction and output each re-read or write ``(N, V)`` in float32).
Accumulation is float32 (float64 for float64 inputs); inputs may be float16, bfloat16,
float32 or float64 and any strides (no contiguous copies); offsets are int64 so
``N * V`` may exceed 2**31; the normaliser ``n`` is read from device memory, so a call
never synchronises with the host.

Launch configuration (shape-specialised, see :func:`kernel_config`): the block is sized
so that each thread moves two 16-byte vectors per input per block (8 float32, 16
bfloat16 elements), with 8 warps for rows of at least that length and fewer warps for
short rows. Interior blocks are unmasked and aligned to 16 bytes in the logits' frame
when the logits have unit vocabulary stride, and so are the direction and the output
whenever their rows have the same phase (see
:mod:`~hessian_eigenthings.loss_fns.fused_ce._triton_rows`), so vocabularies that are not
a multiple of 16 still get 128-bit accesses. ``scripts/gpu_check.py`` measures the table
against a sweep of blocks and warps on the GPU at hand.

The launch runs under ``torch.cuda.device(logits.device)``: Triton launches on the
current device and its current stream, so without the guard logits on ``cuda:1`` in a
process whose current device is ``cuda:0`` would be read through the wrong context.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter; slow, meant for tests). The variable must be set before the process first
imports Triton (Triton builds its standard library for the interpreter or the GPU at
import); the kernel itself is jitted at first launch.
"""

import contextlib
import functools
import os
import warnings
from typing import Any, NamedTuple

import torch

from hessian_eigenthings.loss_fns.fused_ce._common import check_inputs, normaliser, result_dtype

__all__ = ["KernelConfig", "ce_hvp_triton", "kernel_config", "triton_unavailable_reason"]

_VECTOR_BYTES = 16  # one 128-bit load or store
_VECTORS_PER_THREAD = 2  # per input per block
_MAX_WARPS = 8
_MIN_BLOCK = 16  # >= the alignment unit of every dtype (16 bytes / 1 byte)


class KernelConfig(NamedTuple):
    """Launch configuration of the Triton kernel: vocabulary block and warps per row."""

    block: int
    num_warps: int


def kernel_config(vocab: int, element_size: int) -> KernelConfig:
    """The launch configuration for rows of ``vocab`` elements of ``element_size`` bytes.

    Each of the ``32 * num_warps`` threads of a program loads two 16-byte vectors of each
    input per block, ``per_thread = 32 // element_size`` elements (8 float32, 16 bfloat16,
    4 float64): enough bytes in flight to hide DRAM latency with several programs per
    multiprocessor, and few enough registers (``per_thread`` float32 values per input,
    plus as many exponentials) to keep them resident. Rows shorter than
    ``32 * 8 * per_thread`` elements get one block of the next power of two and
    proportionally fewer warps.

    Args:
        vocab: Row length ``V``.
        element_size: Bytes per element of the widest of logits, direction and output.

    Returns:
        ``KernelConfig(block, num_warps)``; ``block`` is a power of two, at least 16.
    """
    per_thread = _VECTORS_PER_THREAD * _VECTOR_BYTES // max(element_size, 1)
    full = 32 * _MAX_WARPS * per_thread
    block = max(_MIN_BLOCK, min(full, 1 << max(vocab - 1, 0).bit_length()))
    num_warps = max(1, min(_MAX_WARPS, block // (32 * per_thread)))
    return KernelConfig(block, num_warps)


def __getattr__(name: str) -> Any:
    if name == "DEFAULT_BLOCK":
        warnings.warn(
            "DEFAULT_BLOCK is deprecated: the Triton kernel's block depends on the vocabulary "
            "and dtype; use kernel_config(vocab, element_size).block.",
            DeprecationWarning,
            stacklevel=2,
        )
        return 4096
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _frames(
    strides: list[tuple[int, int, int]], logits_size: int, vocab: int, block: int
) -> tuple[int, bool, bool]:
    """``(ALIGN, U_FRAME, O_FRAME)`` for the kernel (see ``_triton_rows``).

    ``ALIGN`` is 16 bytes in logits elements when the logits have unit vocabulary stride
    and the block holds at least that many elements, else 1. The direction (output)
    shares the aligned frame when it also has unit vocabulary stride and batch and token
    strides congruent to the logits' modulo ``ALIGN``, so its rows have the same phase.
    """
    zs, us, os_ = strides
    unit = _VECTOR_BYTES // logits_size
    if unit <= 1 or block < unit or (vocab > 1 and zs[2] != 1):
        return 1, False, False

    def shares(s: tuple[int, int, int]) -> bool:
        unit_stride = vocab <= 1 or s[2] == 1
        return unit_stride and (s[0] - zs[0]) % unit == 0 and (s[1] - zs[1]) % unit == 0

    return unit, shares(us), shares(os_)


def _on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` the current CUDA device for a launch (no-op off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch(device: torch.device, grid: tuple[int], args: list[Any], meta: dict[str, Any]) -> None:
    """Launch the kernel on ``device``'s context and current stream."""
    with _on_device(device):
        _kernel()[grid](*args, **meta)


def ce_hvp_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    u: torch.Tensor,
    *,
    ignore_index: int = -100,
    n_valid: int | torch.Tensor | None = None,
    block_size: int | None = None,
    num_warps: int | None = None,
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
        block_size: Vocabulary positions per step (a power of two); default from
            :func:`kernel_config`. Rows longer than the block are streamed in several
            steps.
        num_warps: Warps per row (a power of two); default from :func:`kernel_config`.

    Raises:
        RuntimeError: Triton is missing or cannot run on this device (message says why).
        ValueError: ``block_size`` or ``num_warps`` is not a power of two.
    """
    check_inputs(logits, target, u)
    reason = triton_unavailable_reason(logits.device)
    if reason is not None:
        raise RuntimeError(f"fused='triton' cannot run: {reason}")
    for name, value in (("block_size", block_size), ("num_warps", num_warps)):
        if value is not None and (value < 1 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two, got {value}.")
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
    n_t = normaliser(n_valid, target, ignore_index, logits.device)
    wide = torch.float64 in (logits.dtype, u.dtype)
    if n_t.dtype.is_floating_point:
        n_t = n_t.to(torch.float64 if wide else torch.float32)
    sizes = [logits.element_size(), u.element_size(), out.element_size()]
    config = kernel_config(vocab, max(sizes))
    block = config.block if block_size is None else block_size
    tl = _triton().language
    args = [z3, u3, t2, o3, n_t, tokens, vocab, *zs, *us, tsb, tst, *os_, ignore_index]
    align, u_frame, o_frame = _frames([zs, us, os_], logits.element_size(), vocab, block)
    meta = {
        "BLOCK": block,
        "ALIGN": align,
        "U_FRAME": u_frame,
        "O_FRAME": o_frame,
        "ACC": tl.float64 if wide else tl.float32,
        "num_warps": config.num_warps if num_warps is None else num_warps,
    }
    _launch(logits.device, (rows,), args, meta)
    return out

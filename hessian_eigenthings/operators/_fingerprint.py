r"""Stable hashes of what a batch holds, independent of where it sits in the loader.

Two checks need to recognise a sample by its contents rather than by its position:

- The Monte-Carlo Fisher draws the labels of every sample from a generator keyed by
  the operator's seed and the sample's contents (:func:`sample_keys`,
  :func:`uniforms`), so that a shuffled loader, another batching or another
  ``microbatch_size`` give the same labels to the same samples.
- The data loop compares the samples of two full passes (:func:`pass_fingerprint`) to
  refuse a loader that serves different samples on different passes.

The hash is the 32-bit finaliser of MurmurHash3 (Appleby, 2008) applied to the bit
patterns of every element, mixed with its position inside the sample. It is computed
on the batch's device with int64 arithmetic on values below :math:`2^{32}` whose
products stay below :math:`2^{49}` (no overflow), and nothing is read on the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch

__all__ = [
    "batch_tensors",
    "pass_fingerprint",
    "positions",
    "sample_keys",
    "same_batch",
    "uniforms",
]

_M32 = 0xFFFFFFFF
T = TypeVar("T", int, torch.Tensor)


def _mul32(h: T, c: int) -> T:
    """``h * c mod 2**32`` for ``h < 2**32``, in 16-bit halves (products < 2**49)."""
    return ((h & 0xFFFF) * c + ((((h >> 16) * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: T) -> T:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with p ~ 1/2."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _mix(a: T, b: T | int) -> T:
    """A 32-bit hash of the pair ``(a, b)`` (both in ``[0, 2**32)``)."""
    return _fmix32((_mul32(_fmix32(a), 0x9E3779B1) + b + 0x7F4A7C15) & _M32)


def batch_tensors(batch: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) batch in a fixed order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for key in batch for t in batch_tensors(batch[key])]
    if isinstance(batch, (tuple, list)):
        return [t for item in batch for t in batch_tensors(item)]
    return []


def _words(t: torch.Tensor) -> torch.Tensor:
    """One int64 in ``[0, 2**32)`` per element: its bit pattern (64-bit ones hashed)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    size = t.element_size()
    if size == 8:
        bits = t.view(torch.int64)
        return _mix(bits & _M32, (bits >> 32) & _M32)
    if size == 4:
        return t.view(torch.int32).to(torch.int64) & _M32
    if size == 2:
        return t.view(torch.int16).to(torch.int64) & 0xFFFF
    return t.view(torch.uint8).to(torch.int64)


# Rows hashed at once: temporaries of at most this many int64 words (64 MiB) each.
_CHUNK_WORDS = 1 << 23


def _content_hash(t: torch.Tensor, n: int) -> torch.Tensor:
    """``(n,)`` hashes of the rows ``t[i]``, each element mixed with its position."""
    rows = t.reshape(n, -1)
    width = rows.shape[1]
    position = torch.arange(width, device=t.device, dtype=torch.int64)
    step = max(1, _CHUNK_WORDS // max(width, 1))
    sums = [_mix(_words(rows[i : i + step]), position).sum(1) & _M32 for i in range(0, n, step)]
    return _fmix32(sums[0] if len(sums) == 1 else torch.cat(sums))


def sample_keys(batch: Any, n: int) -> torch.Tensor | None:
    """``(n,)`` int64 keys of the ``n`` samples of ``batch``, from their contents.

    The samples are the rows of the batch's tensors whose leading dimension is ``n``; a
    sample's key depends on its values in every such tensor (and their order in the
    batch), not on its position, its batch or how the batch was split. Identical
    samples get identical keys.

    Returns:
        The keys, or ``None`` if no tensor of the batch has leading dimension ``n``.
    """
    key: torch.Tensor | None = None
    for slot, t in enumerate(batch_tensors(batch)):
        if t.dim() == 0 or t.shape[0] != n:
            continue
        h = _mix(_content_hash(t, n), slot)
        key = h if key is None else _mix(key, h)
    return key


def positions(keys: torch.Tensor, per: int) -> torch.Tensor:
    """``(len(keys) * per,)`` keys of the ``per`` positions of each keyed sample, in order."""
    position = torch.arange(per, device=keys.device, dtype=torch.int64)
    return _mix(keys[:, None], position).reshape(-1)


def pass_fingerprint(batch: Any) -> torch.Tensor:
    """A 0-d int64 hash of the samples of ``batch`` that adds up over a pass.

    The sum over the batches of a pass depends on which samples the pass holds, not on
    their order or on how they are grouped into batches (for batches whose tensors are
    indexed by sample; other tensors count once per batch).
    """
    total: torch.Tensor | None = None
    for slot, t in enumerate(batch_tensors(batch)):
        n = t.shape[0] if t.dim() > 0 else 1
        rows = _mix(_content_hash(t.reshape(n, -1), n), slot).sum()
        total = rows if total is None else total + rows
    return torch.zeros((), dtype=torch.int64) if total is None else total


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its width (no copy): NaN payloads compare equal."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if not t.is_floating_point():
        return t
    return t.view(
        {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    )


def same_batch(a: Any, b: Any) -> bool:
    """Whether two batches hold the same structure and bit-identical tensors (host read)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        return bool(torch.equal(_bits(a), _bits(b)))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a) == list(b) and all(same_batch(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_batch(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # objects without a usable equality: assume they did not change
        return True


def uniforms(keys: torch.Tensor, seed: int, count: int) -> torch.Tensor:
    """``(len(keys), count)`` float64 numbers, uniform on ``[0, 1)`` with 53 random bits.

    Entry ``(r, s)`` is a function of ``(seed, keys[r], s)`` only.
    """
    draws = torch.arange(count, device=keys.device, dtype=torch.int64)
    base = _mix(_mix(keys, seed & _M32), (seed >> 32) & _M32)
    hi = _mix(base[:, None], draws)
    lo = _mix(hi, 0x2545F491)
    return (hi * (1 << 21) + (lo >> 11)).to(torch.float64) * 2.0**-53

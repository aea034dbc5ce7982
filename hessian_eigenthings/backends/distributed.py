r"""Backends for vectors in a ``torch.distributed`` job: replicated or sharded across ranks.

Two layouts occur in distributed curvature computations:

* **Replicated** (data parallelism, DDP): every rank holds the whole parameter vector
  and every rank's copy of a Lanczos vector is identical. Arithmetic is local
  (:class:`ReplicatedBackend` is :class:`SingleDeviceBackend` arithmetic); the only
  thing to get right is that random probes are identical on every rank, also for
  ``seed=None``, so the seed is broadcast from the group's first rank.
* **Sharded** (parameter sharding, FSDP2): rank ``r`` holds the entries of every
  vector that belong to its parameter shards, a set of index ranges
  :math:`I_r \subset \{0, \dots, n-1\}` partitioning the global index set.
  :class:`ShardedBackend` all-reduces every reduction,
  :math:`\langle x, y \rangle = \sum_r \langle x_{I_r}, y_{I_r} \rangle`, so all ranks
  see the same scalars (all-reduce returns identical bits on every rank), and draws
  random probes chunk by chunk from generators seeded by (stream, probe, chunk index):
  each rank draws only the chunks that hold its entries, and a probe does not depend on
  the number of ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from hessian_eigenthings.backends.base import (
    LinAlgBackend,
    draw_probes,
    seeded_generator,
    stream_key,
)
from hessian_eigenthings.backends.devices import local_accelerator
from hessian_eigenthings.backends.single_device import SingleDeviceBackend

__all__ = ["ReplicatedBackend", "ShardedBackend", "broadcast_seed", "collective_device"]

ProcessGroup = Any  # torch.distributed.ProcessGroup (None means the default group)


def _require_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs an initialised torch.distributed process group. Call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment "
            "variables it reads)."
        )


def collective_device(process_group: ProcessGroup, preferred: torch.device) -> torch.device:
    """Device on which small control tensors for ``process_group`` must live.

    NCCL groups communicate CUDA tensors only: a tensor already on a GPU stays there;
    anything else goes to this process's GPU (:func:`~hessian_eigenthings.backends.
    devices.local_accelerator`: the group's bound device, the device selected with
    ``torch.cuda.set_device``, or ``LOCAL_RANK``; never GPU 0 on every rank). gloo
    groups accept CPU and CUDA tensors.
    """
    backend = str(dist.get_backend(process_group)).lower()
    if "nccl" in backend and preferred.type != "cuda":
        return local_accelerator(process_group)
    if backend == "gloo" and preferred.type not in ("cpu", "cuda"):
        return torch.device("cpu")
    return preferred


def broadcast_seed(seed: int, process_group: ProcessGroup, device: torch.device) -> int:
    """Return the seed of the group's first rank on every rank (one small broadcast).

    Makes ``seed=None`` (a fresh OS-entropy seed per process) agree across ranks, and
    turns a seed that accidentally differs between ranks into the same one.
    """
    src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    t = torch.tensor([seed], dtype=torch.int64, device=collective_device(process_group, device))
    dist.broadcast(t, src=src, group=process_group)
    return int(t.item())


def _broadcast_value(value: torch.Tensor, process_group: ProcessGroup) -> torch.Tensor:
    src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    dev = collective_device(process_group, value.device)
    t = value.detach().to(dev).clone()
    dist.broadcast(t, src=src, group=process_group)
    return t.to(value.device)


class _GroupAgreement:
    """How the processes of ``process_group`` agree (shared by both distributed backends).

    Seeds and flags come from the group's first rank (one small broadcast each); that
    rank writes shared files, and :meth:`barrier` waits for the group only.
    """

    process_group: ProcessGroup

    def generator(self, seed: int, device: torch.device) -> torch.Generator:
        return seeded_generator(broadcast_seed(seed, self.process_group, device), device)

    def all_agree(self, value: torch.Tensor) -> torch.Tensor:
        return _broadcast_value(value, self.process_group)

    def is_first_process(self) -> bool:
        return dist.get_rank(self.process_group) == 0

    def barrier(self) -> None:
        dist.barrier(group=self.process_group)


class ReplicatedBackend(_GroupAgreement, SingleDeviceBackend):
    """Whole vectors, replicated identically on every rank of ``process_group``.

    Arithmetic is local (no communication); :meth:`generator` broadcasts the seed from
    the group's first rank so that random probes and start vectors are identical on
    every rank, whatever seed each rank passed (``seed=None`` draws a different fresh
    seed per process). :meth:`all_agree` broadcasts a value from the first rank.

    Args:
        process_group: The group the vectors are replicated over (``None``: default).
    """

    def __init__(self, process_group: ProcessGroup = None) -> None:
        _require_initialized("ReplicatedBackend")
        self.process_group = process_group

    def __repr__(self) -> str:
        return f"ReplicatedBackend(world_size={dist.get_world_size(self.process_group)})"


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs, platforms and ranks)."""
    data = b"".join(int(p).to_bytes(16, "little", signed=True) for p in parts)
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _check_partition(rank_ranges: Sequence[Sequence[tuple[int, int]]], size: int) -> None:
    spans = sorted((a, b) for ranges in rank_ranges for a, b in ranges if b > a)
    for a, b in (r for ranges in rank_ranges for r in ranges):
        if not (0 <= a <= b <= size):
            raise ValueError(f"Shard range ({a}, {b}) is outside a vector of size {size}.")
    pos = 0
    for a, b in spans:
        if a != pos:
            what = "overlap" if a < pos else "gap"
            raise ValueError(
                f"Shard ranges must partition [0, {size}) exactly; found a {what} at index "
                f"{min(a, pos)}."
            )
        pos = b
    if pos != size:
        raise ValueError(f"Shard ranges cover [0, {pos}) but the vector size is {size}.")


class ShardedBackend(_GroupAgreement, LinAlgBackend[torch.Tensor]):
    r"""Vectors split across the ranks of ``process_group``; reductions all-reduce.

    Rank ``r`` holds the entries ``x[a:b]`` for each ``(a, b)`` in
    ``rank_ranges[r]``, concatenated in that order (its *local shard*, a flat tensor
    of :meth:`local_size` entries). The ranges of all ranks partition ``[0, size)``.

    Reductions (:meth:`dot`, :meth:`norm`, :meth:`gram`)
    compute the local partial result and ``all_reduce`` it (one collective each), so
    every rank returns the same value. Elementwise arithmetic needs no backend: the
    algorithms apply it to the local shards directly.

    :meth:`probes` is counter-based: the global index set is cut into chunks of
    ``chunk_size`` entries, and entry ``j`` of probe ``i`` is entry ``j mod chunk_size``
    of a draw from a fresh generator seeded by ``(key, i, j // chunk_size)``, where
    ``key`` is read from ``generator``'s state (which then advances, as after a draw).
    A rank draws only the chunks that hold its entries (each once per probe), so its
    work is ``O(n_local + chunk_size x ranges)``,
    never more than the global vector, instead of ``O(n)`` per probe; and the probes
    are the same for any number of ranks and any split, given the seed and
    ``chunk_size``. They differ from :class:`SingleDeviceBackend`'s probes for the same
    seed (equally distributed). No host synchronisation: the key comes from the
    generator's host-side state. :meth:`generator` broadcasts the seed from the
    group's first rank.

    Args:
        rank_ranges: For every rank of the group (group rank order), its index ranges.
        size: Global vector size ``n``.
        process_group: The group (``None``: default group).
        chunk_size: Entries per seeded chunk of the probes; part of the probes'
            definition (every rank, and a resumed run, must use the same).

    Raises:
        ValueError: The ranges do not partition ``[0, size)`` or do not list every rank.
    """

    def __init__(
        self,
        rank_ranges: Sequence[Sequence[tuple[int, int]]],
        size: int,
        process_group: ProcessGroup = None,
        *,
        chunk_size: int = 1 << 20,
    ) -> None:
        _require_initialized("ShardedBackend")
        world = dist.get_world_size(process_group)
        if len(rank_ranges) != world:
            raise ValueError(
                f"rank_ranges lists {len(rank_ranges)} ranks but the process group has {world}."
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
        rank_ranges = [[(int(a), int(b)) for a, b in ranges] for ranges in rank_ranges]
        _check_partition(rank_ranges, size)
        self.process_group = process_group
        self.size = size
        self.rank = dist.get_rank(process_group)
        self.rank_ranges = rank_ranges
        self.ranges = rank_ranges[self.rank]
        self.chunk_size = chunk_size
        self._local = sum(b - a for a, b in self.ranges)

    @classmethod
    def contiguous(cls, size: int, process_group: ProcessGroup = None) -> ShardedBackend:
        """Rank ``r`` holds ``[r c, min((r + 1) c, size))`` with ``c = ceil(size / world)``."""
        _require_initialized("ShardedBackend")
        world = dist.get_world_size(process_group)
        c = -(-size // world)
        return cls(
            [[(min(r * c, size), min((r + 1) * c, size))] for r in range(world)],
            size,
            process_group,
        )

    # -- reductions ---------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.process_group)
        return t

    def dot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(torch.dot(x, y))

    def gram(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(X.T @ Y)

    def local_size(self, n: int) -> int:
        if n != self.size:
            raise ValueError(
                f"ShardedBackend was built for vectors of global size {self.size}, asked about "
                f"size {n}."
            )
        return self._local

    # -- shards ------------------------------------------------------------------------
    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's entries of a global vector (or of every row of a block)."""
        if full.shape[-1] != self.size:
            raise ValueError(
                f"shard expected a last dimension of {self.size}, got {tuple(full.shape)}."
            )
        if not self.ranges:
            return full[..., :0]
        return torch.cat([full[..., a:b] for a, b in self.ranges], dim=-1)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The global vector from every rank's flat shard (an all-gather; for checks)."""
        if local.dim() != 1 or local.numel() != self._local:
            raise ValueError(
                f"gather expected a local shard of shape ({self._local},), got "
                f"{tuple(local.shape)}."
            )
        sizes = [sum(b - a for a, b in ranges) for ranges in self.rank_ranges]
        width = max(sizes)
        padded = torch.zeros(width, dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.process_group)
        out = torch.empty(self.size, dtype=local.dtype, device=local.device)
        for part, ranges in zip(parts, self.rank_ranges):
            pos = 0
            for a, b in ranges:
                out[a:b] = part[pos : pos + b - a]
                pos += b - a
        return out

    # -- randomness --------------------------------------------------------------------
    def probes(
        self,
        n: int,
        num: int,
        *,
        generator: torch.Generator,
        dtype: torch.dtype,
        device: torch.device,
        distribution: str = "gaussian",
    ) -> torch.Tensor:
        """``num`` probes of global size ``n``; this rank's entries as ``(n_local, num)``.

        See the class docstring: chunk ``c`` of probe ``i`` comes from a generator seeded
        by ``(key, i, c)``; only the chunks overlapping this rank's ranges are drawn.
        """
        local = self.local_size(n)
        key = stream_key(generator)
        out = torch.empty((num, local), dtype=dtype, device=device)
        # (chunk, first, last) needed per chunk, and where each piece lands locally
        pieces: dict[int, list[tuple[int, int, int]]] = {}
        pos = 0
        for a, b in self.ranges:
            for c in range(a // self.chunk_size, -(-b // self.chunk_size)):
                c0 = c * self.chunk_size
                lo, hi = max(a, c0), min(b, c0 + self.chunk_size)
                pieces.setdefault(c, []).append((lo - c0, hi - c0, pos + lo - a))
            pos += b - a
        for i in range(num):
            for c, parts in pieces.items():
                gen = seeded_generator(_mix(key, i, c), device)
                # the whole chunk: a prefix of a draw is not a shorter draw (vectorised
                # samplers fill blocks), so every rank draws the same length
                width = min(self.chunk_size, n - c * self.chunk_size)
                chunk = draw_probes(
                    (width,), generator=gen, dtype=dtype, device=device, distribution=distribution
                )
                for lo, hi, at in parts:
                    out[i, at : at + hi - lo] = chunk[lo:hi]
        return out.T

    def __repr__(self) -> str:
        return (
            f"ShardedBackend(size={self.size}, local_size={self._local}, "
            f"world_size={len(self.rank_ranges)})"
        )

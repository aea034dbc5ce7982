"""Vector arithmetic that algorithms use, abstracted over where the vector lives.

Algorithms never touch vector storage directly: they call a :class:`LinAlgBackend`.
A single-device backend works on flat tensors; a sharded backend holds one shard of
every vector per rank and all-reduces its reductions, so the same Lanczos, trace and
SLQ code runs on both.

Reductions return 0-d (or 1-d) tensors on the vectors' device, never Python floats, so
that algorithms can batch their host synchronisations.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import torch

__all__ = ["LinAlgBackend", "VectorT", "fresh_seed"]

VectorT = TypeVar("VectorT")


def fresh_seed() -> int:
    """A new seed from the OS entropy pool (``seed=None`` means fresh randomness).

    Independent of ``torch.manual_seed``, so a script that fixes torch's global seed
    does not silently make ``seed=None`` runs identical.
    """
    return secrets.randbits(62)


class LinAlgBackend(ABC, Generic[VectorT]):
    """Operations on vectors of type ``VectorT`` (and blocks of them, stacked as rows).

    A *block* is a 2-D tensor of shape ``(m, n_local)`` whose rows are vectors.
    """

    @abstractmethod
    def dot(self, x: VectorT, y: VectorT) -> torch.Tensor:
        """``<x, y>`` as a 0-d tensor."""

    def norm(self, x: VectorT) -> torch.Tensor:
        """``||x||_2`` as a 0-d tensor."""
        return torch.sqrt(torch.clamp(self.dot(x, x), min=0))

    @abstractmethod
    def block_dot(self, X: torch.Tensor, y: VectorT) -> torch.Tensor:
        """``X y``: inner products of every row of ``X`` with ``y``, shape ``(m,)``."""

    @abstractmethod
    def block_gram(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``X Y^T``: all inner products between rows, shape ``(m, p)``."""

    @abstractmethod
    def local_size(self, n: int) -> int:
        """Number of entries of an ``n``-vector held by this process."""

    @abstractmethod
    def random(
        self,
        n: int,
        *,
        num: int | None = None,
        generator: torch.Generator,
        dtype: torch.dtype,
        device: torch.device,
        distribution: str = "gaussian",
    ) -> torch.Tensor:
        """Random probe(s) of global size ``n`` (this process's part of it).

        Args:
            n: Global vector size.
            num: Number of vectors; ``None`` gives one flat vector, an int a block
                ``(num, n_local)``.
            generator: Seeded generator on ``device`` (see :meth:`generator`).
            dtype: Floating dtype of the probes.
            device: Device of the probes (the operator's device).
            distribution: ``"gaussian"`` (standard normal) or ``"rademacher"`` (+-1).

        Every rank of a distributed backend draws the same global vector and keeps its
        shard, so results do not depend on the number of ranks.
        """

    def generator(self, seed: int, device: torch.device) -> torch.Generator:
        """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen

    def all_agree(self, value: torch.Tensor) -> torch.Tensor:
        """Return ``value`` as seen identically by every process (identity here)."""
        return value

"""Vector arithmetic that algorithms use, abstracted over where the vector lives.

Algorithms never touch vector storage directly: they call a :class:`LinAlgBackend`.
A single-device backend works on flat tensors; a sharded backend holds one shard of
every vector per rank and all-reduces its reductions, so the same Lanczos, trace and
SLQ code runs on both.

Blocks of vectors are *columns*, as in :meth:`CurvatureOperator.matmat
<hessian_eigenthings.operators.CurvatureOperator.matmat>`: a block of ``b`` vectors is a
2-D tensor of shape ``(n_local, b)``.

Reductions return 0-d (or 1-d, 2-d) tensors on the vectors' device, never Python floats,
so that algorithms can batch their host synchronisations. The backend is also where an
algorithm's processes agree: on a seed, on a flag (stop now, write a checkpoint now),
and on which process writes files (:meth:`LinAlgBackend.is_first_process`); a backend
without a process group agrees with itself at no cost.
"""

from __future__ import annotations

import hashlib
import secrets
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

__all__ = [
    "Draw",
    "LinAlgBackend",
    "VectorT",
    "draw_probes",
    "fresh_seed",
    "seeded_generator",
    "stream_key",
]

VectorT = TypeVar("VectorT")
#: ``draw(shape)``: the next ``shape`` random numbers of a probe stream (see ``probes``).
Draw = Callable[[tuple[int, ...]], torch.Tensor]


def draw_probes(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    distribution: str,
) -> torch.Tensor:
    """Draw Gaussian or Rademacher probes directly on ``device`` (no host copy).

    Reduced-precision dtypes are drawn in float32 and rounded, so Rademacher entries
    stay exactly +-1 and Gaussian tails are not clipped by bfloat16 sampling.
    """
    draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    if distribution == "gaussian":
        out = torch.randn(shape, generator=generator, dtype=draw_dtype, device=device)
    elif distribution == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=device)
        out = bits.to(draw_dtype).mul_(2).sub_(1)
    else:
        raise ValueError(
            f"Unknown probe distribution {distribution!r}; expected 'gaussian' or 'rademacher'."
        )
    return out.to(dtype)


def fresh_seed() -> int:
    """A new seed from the OS entropy pool (``seed=None`` means fresh randomness).

    Independent of ``torch.manual_seed``, so a script that fixes torch's global seed
    does not silently make ``seed=None`` runs identical.
    """
    return secrets.randbits(62)


class LinAlgBackend(ABC, Generic[VectorT]):
    """Operations on vectors of type ``VectorT`` and on column blocks ``(n_local, b)``."""

    @abstractmethod
    def dot(self, x: VectorT, y: VectorT) -> torch.Tensor:
        """``<x, y>`` as a 0-d tensor."""

    def norm(self, x: VectorT) -> torch.Tensor:
        """``||x||_2`` as a 0-d tensor."""
        return torch.sqrt(torch.clamp(self.dot(x, x), min=0))

    @abstractmethod
    def gram(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``X^T Y``: inner products of the columns of ``X`` with ``Y``.

        Args:
            X: Block ``(n_local, p)``.
            Y: Vector ``(n_local,)`` (result ``(p,)``) or block ``(n_local, q)`` (result
                ``(p, q)``).
        """

    @abstractmethod
    def local_size(self, n: int) -> int:
        """Number of entries of an ``n``-vector held by this process."""

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
        """``num`` random probes of global size ``n`` as the columns of ``(n_local, num)``.

        Args:
            n: Global vector size.
            num: Number of probes.
            generator: Seeded generator on ``device``.
            dtype: Floating dtype of the probes.
            device: Device of the probes (the operator's device).
            distribution: ``"gaussian"`` (standard normal) or ``"rademacher"`` (+-1).

        The probes are one draw of shape ``(num, n)`` from ``generator`` (transposed),
        so a seed gives the same probes on every backend, and every rank of a distributed
        backend draws the same global probes and keeps its entries (results do not depend
        on the number of ranks).
        """

        def draw(shape: tuple[int, ...]) -> torch.Tensor:
            return draw_probes(
                shape, generator=generator, dtype=dtype, device=device, distribution=distribution
            )

        return self._local_rows(n, num, draw, torch.empty(0, dtype=dtype, device=device)).T

    def _local_rows(self, n: int, num: int, draw: Draw, like: torch.Tensor) -> torch.Tensor:
        """This process's entries ``(num, n_local)`` of the draw ``draw((num, n))``.

        ``draw(shape)`` continues the generator's stream, so a backend may draw the
        ``(num, n)`` block in consecutive pieces instead of at once; ``like`` is an empty
        tensor of the probes' dtype and device. Default: the whole block at once (a
        backend whose processes hold whole vectors).
        """
        return draw((num, n))

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
        """One random probe of global size ``n`` (this process's ``(n_local,)`` part).

        ``num=int`` (deprecated) returns ``num`` probes as the *rows* of
        ``(num, n_local)``; use :meth:`probes`, which returns them as columns.
        """
        if num is not None:
            warnings.warn(
                "LinAlgBackend.random(n, num=...) returning rows is deprecated; use "
                "backend.probes(n, num, ...), which returns the probes as columns (n_local, num).",
                DeprecationWarning,
                stacklevel=2,
            )
        block = self.probes(
            n,
            1 if num is None else num,
            generator=generator,
            dtype=dtype,
            device=device,
            distribution=distribution,
        )
        return block[:, 0] if num is None else block.T

    def block_dot(self, X: torch.Tensor, y: VectorT) -> torch.Tensor:
        """Deprecated: ``X y`` for the *rows* of ``X``; use ``gram(X.T, y)``."""
        _deprecated("block_dot(X, y)", "gram(X.T, y)")
        return self.gram(X.T, y)  # type: ignore[arg-type]

    def block_gram(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Deprecated: ``X Y^T`` between *rows*; use ``gram(X.T, Y.T)``."""
        _deprecated("block_gram(X, Y)", "gram(X.T, Y.T)")
        return self.gram(X.T, Y.T)

    def generator(self, seed: int, device: torch.device) -> torch.Generator:
        """A ``torch.Generator`` on ``device`` seeded with ``seed``.

        Distributed backends seed it with the group's first rank's ``seed`` (one
        broadcast); an algorithm that has already agreed on its seed uses
        :func:`seeded_generator` instead.
        """
        return seeded_generator(seed, device)

    def all_agree(self, value: torch.Tensor) -> torch.Tensor:
        """Return ``value`` as seen identically by every process (identity here)."""
        return value

    def agree(self, flag: bool) -> bool:
        """The first process's ``flag`` on every process (``flag`` itself here).

        Used for decisions that depend on a process's clock (stop at a time limit, write
        a checkpoint now), so that every process takes them at the same point of a run.
        """
        return bool(self.all_agree(torch.tensor([int(flag)], dtype=torch.int64)))

    def is_first_process(self) -> bool:
        """Whether this process writes what the group shares (checkpoints); True here."""
        return True

    def barrier(self) -> None:
        """Wait until every process of the group gets here (nothing to wait for here)."""


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (no communication)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def stream_key(generator: torch.Generator) -> int:
    """A 63-bit key read from ``generator``'s state, which then advances (no host sync).

    Equal generator states give equal keys, so processes whose generators agree (the same
    seed, the same draws so far) agree on the key, and a generator restored from a
    checkpoint gives the key it gave then. The state is host-side data also for CUDA
    generators (a Philox seed and offset); advancing it draws one number on its device.
    """
    state = generator.get_state()
    digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8, person=b"he-probes").digest()
    torch.empty(1, device=generator.device).normal_(generator=generator)
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"LinAlgBackend.{old} (blocks as rows) is deprecated; blocks are columns "
        f"(n_local, b) as in CurvatureOperator.matmat: use backend.{new}.",
        DeprecationWarning,
        stacklevel=3,
    )

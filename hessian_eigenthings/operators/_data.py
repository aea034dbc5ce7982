"""The data side of every data-averaged operator: batches, weights, microbatches.

A data operator is the curvature of the mean loss over all samples (or tokens) it
uses. Batches are weighted by how many samples they hold (:func:`leading_dim`) or by a
loss-specific count (``loss_fn.batch_weight``, e.g. non-ignored tokens), so ragged
batches and microbatches give exactly the un-split result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, WeightedRandomSampler

from hessian_eigenthings.operators._fingerprint import pass_fingerprint, same_batch

__all__ = [
    "BatchSource",
    "Piece",
    "WeightFn",
    "leading_dim",
    "move_to_device",
    "split_batch",
]

WeightFn = Callable[[Any], "int | torch.Tensor"]


@dataclass(frozen=True)
class Piece:
    """One (micro)batch of a product, as the data loop hands it to an operator's hooks.

    Attributes:
        data: The (micro)batch, on the operator's device.
        batch_index: Index of its batch in loader order (the position in the stream
            for ``full_dataset=False``).
        microbatch_index: Index of the piece within its batch (0 when not split).
        weight: Its weight ``w_b`` in the dataset mean: samples, or non-ignored tokens
            (an int, or a 0-d tensor on the device that is never read on the host).
    """

    data: Any
    batch_index: int
    microbatch_index: int
    weight: int | torch.Tensor


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, (tuple, list)):
        items = batch
    else:
        return None
    for item in items:
        t = _first_tensor(item)
        if t is not None:
            return t
    return None


def leading_dim(batch: Any) -> int:
    """Number of samples in ``batch``: the leading dimension of its first tensor.

    Raises:
        ValueError: The batch holds no tensor with a leading dimension.
    """
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError(
            f"Cannot infer the batch size of a {type(batch).__name__}: it holds no tensor with "
            "a leading (batch) dimension. Pass weight_fn=lambda batch: <number of samples>."
        )
    return int(t.shape[0])


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        mapped = {k: _map_tensors(v, fn) for k, v in batch.items()}
        try:
            return type(batch)(mapped)  # type: ignore[call-arg]  # dict, OrderedDict, BatchEncoding
        except TypeError:
            return mapped
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map_tensors(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of ``batch`` to ``device`` (non-blocking; dtypes unchanged)."""
    return _map_tensors(
        batch, lambda t: t if t.device == device else t.to(device, non_blocking=True)
    )


def split_batch(batch: Any, size: int) -> list[Any]:
    """Split ``batch`` along its leading dimension into pieces of at most ``size`` samples.

    Tensors whose leading dimension equals the batch size are sliced; everything else
    (scalars, non-tensors, tensors of another leading size) is shared by all pieces.
    Slices are views: no data is copied.
    """
    n = leading_dim(batch)
    if n <= size:
        return [batch]

    def piece(start: int) -> Any:
        stop = min(start + size, n)
        return _map_tensors(
            batch, lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == n else t
        )

    return [piece(s) for s in range(0, n, size)]


class BatchSource:
    """Serves batches to a data operator, one full pass or one batch per matvec.

    Args:
        dataloader: A re-iterable of batches (list, ``DataLoader``, any object whose
            ``__iter__`` returns a fresh iterator) or a zero-argument callable returning
            such an iterable (a generator factory).
        full_dataset: ``True``: every matvec uses all batches (or the first
            ``num_batches``). ``False``: every matvec draws the next batch, cycling
            through the loader (the stochastic operator power iteration consumes).
        num_batches: Use only the first ``num_batches`` batches.
        microbatch_size: Split each batch into pieces of at most this many samples.
        device: Device to move batches to.

    Data that change between passes: with ``full_dataset=True`` every product must
    average over the same samples, or the operator is a different random matrix on
    every product. At construction the first batches of two passes are compared, and a
    ``DataLoader``'s sampler is inspected. A loader that shuffles (or whose first batch
    changes) is refused when a pass may not cover every sample (``num_batches``,
    ``drop_last`` with a remainder, a sampler with replacement); otherwise the samples
    of the first two passes are compared (an order-free hash of their contents, one
    host read after the second pass) and a difference raises then.

    Raises:
        TypeError: ``dataloader`` is a one-shot iterator (it would be exhausted after
            the first matvec).
        ValueError: Bad ``num_batches`` / ``microbatch_size``, an empty dataloader, or
            data that change between passes (see above).
    """

    def __init__(
        self,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        *,
        full_dataset: bool = True,
        num_batches: int | None = None,
        microbatch_size: int | None = None,
        device: torch.device,
    ) -> None:
        if isinstance(dataloader, Iterator):
            raise TypeError(
                f"dataloader is a one-shot iterator ({type(dataloader).__name__}); it would "
                "be exhausted after the first matvec. Pass a list, a DataLoader, or a "
                "zero-argument function that returns a fresh iterable (lambda: my_generator())."
            )
        if not (callable(dataloader) or isinstance(dataloader, Iterable)):
            raise TypeError(
                "dataloader must be an iterable of batches or a function returning one, "
                f"got {type(dataloader).__name__}."
            )
        for name, value in (("num_batches", num_batches), ("microbatch_size", microbatch_size)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
        self._loader = dataloader
        self.full_dataset = full_dataset
        self.num_batches = num_batches
        self.microbatch_size = microbatch_size
        self.device = device
        self._stream: Iterator[Any] | None = None
        self._stream_pos = 0
        self.batch_index = -1  # index (in loader order) of the batch being processed
        self._where: str | None = None  # what a pass is doing, for error messages
        first = next(iter(self._iterable()), _EMPTY)
        if first is _EMPTY:
            raise ValueError(
                "dataloader is empty: it yielded no batch. A data operator needs at least one."
            )
        self._first: Any = first  # kept for the construction probe (first_batch)
        # Order-free hashes of completed passes, while the first two are compared.
        self._passes: list[torch.Tensor] | None = None
        if full_dataset:
            self._check_passes_agree(first)

    def _iterable(self) -> Iterable[Any]:
        if isinstance(self._loader, Iterable):
            return self._loader
        made = self._loader()
        if not isinstance(made, Iterable):
            raise TypeError(
                f"dataloader factory must return an iterable, got {type(made).__name__}."
            )
        return made

    def _check_passes_agree(self, first: Any) -> None:
        """Refuse data that change between passes where a pass may not hold every sample."""
        second = next(iter(self._iterable()), _EMPTY)
        if second is _EMPTY:
            raise ValueError(_SPENT)
        shuffles = _shuffling_sampler(self._loader)
        if not shuffles and same_batch(first, second):
            return
        why = (
            f"its sampler is a {shuffles} (shuffle=True)"
            if shuffles
            else "the first batch differs between two passes (shuffled, or random "
            "augmentations or random data)"
        )
        partial = _partial_pass(self._loader, self.num_batches)
        if partial is not None:
            raise ValueError(
                f"dataloader serves different data on every pass ({why}), and {partial}, so "
                "each product would average over a different subset of the samples: the "
                "operator would be a different random matrix on every product. Use a fixed "
                "order (shuffle=False; the order does not matter for a full pass) and no "
                "random augmentations, or full passes (num_batches=None, drop_last=False), or "
                "full_dataset=False for a deliberately stochastic operator."
            )
        self._passes = []  # compare the samples of the first two full passes

    def first_batch(self) -> Any:
        """The first batch of the loader, on the device (for probes)."""
        first, self._first = self._first, None
        if first is None:
            first = next(iter(self._iterable()), _EMPTY)
            if first is _EMPTY:
                raise ValueError(_SPENT)
        return move_to_device(first, self.device)

    def probe_batches(self) -> Iterator[tuple[int, Any]]:
        """``(index, batch)`` on the device from the start of a pass, for probes."""
        yield 0, self.first_batch()
        for i, batch in enumerate(self._iterable()):
            if i == 0:
                continue
            if self.num_batches is not None and i >= self.num_batches:
                return
            yield i, move_to_device(batch, self.device)

    def position(self) -> str | None:
        """Where the current pass is, for error messages (``None`` between passes)."""
        return self._where

    def _fetch(self, it: Iterator[Any], index: int) -> Any:
        self._where = f"fetching batch index {index} from the dataloader"
        batch = next(it, _EMPTY)
        self._where = f"processing batch index {index} (loader order)"
        return batch

    def _full_pass(self) -> Iterator[Any]:
        count = 0
        # ``_where`` stays set if the pass is abandoned by an exception: the product's
        # guard reads it after this generator was closed
        self._where = "starting a pass over the dataloader"
        it = iter(self._iterable())
        while self.num_batches is None or count < self.num_batches:
            batch = self._fetch(it, count)
            if batch is _EMPTY:
                break
            self.batch_index = count
            count += 1
            yield batch
        self._where = None
        if count == 0:
            raise ValueError(
                "dataloader yielded no batch on this pass, though it yielded batches at "
                "construction: it can be iterated only once or ran dry. Pass a list, a "
                "DataLoader, or a zero-argument function returning a fresh iterable."
            )

    def _record_pass(self, total: torch.Tensor) -> None:
        """Compare the samples of the first two passes (one host read, once)."""
        passes = self._passes
        if passes is None:
            return
        passes.append(total)
        if len(passes) < 2:
            return
        self._passes = None
        if not bool(passes[0].to(total.device) == passes[1]):
            raise ValueError(
                "dataloader served different samples in the first two passes (the hash of "
                "their contents differs): random augmentations, random data, or a sampler "
                "that draws a different subset each pass. Every product would then be a "
                "different random matrix. Use fixed data (no random transforms, a fixed "
                "subset), or full_dataset=False for a deliberately stochastic operator."
            )

    def _next_stochastic(self) -> Any:
        for _ in range(2):
            if self._stream is None:
                self._stream = iter(self._iterable())
                self._stream_pos = 0
            if self.num_batches is None or self._stream_pos < self.num_batches:
                batch = self._fetch(self._stream, self._stream_pos)
                if batch is not _EMPTY:
                    self.batch_index = self._stream_pos
                    self._stream_pos += 1
                    return batch
            self._stream = None  # exhausted (or reached num_batches): start a new epoch
        raise ValueError("dataloader yielded no batch when restarted for a new epoch.")

    def batches(self) -> Iterator[Any]:
        """Batches (on the device) that one matvec averages over."""
        if not self.full_dataset:
            yield move_to_device(self._next_stochastic(), self.device)
            return
        verify = self._passes is not None
        total: torch.Tensor | None = None
        for batch in self._full_pass():
            moved = move_to_device(batch, self.device)
            if verify:  # hashed on the device, during the first two passes only
                fp = pass_fingerprint(moved)
                total = fp if total is None else total + fp.to(total.device)
            yield moved
        if total is not None:
            self._record_pass(total)

    def microbatches(self, batch: Any) -> list[Any]:
        """``batch`` split by ``microbatch_size`` (or ``[batch]``)."""
        if self.microbatch_size is None:
            return [batch]
        return split_batch(batch, self.microbatch_size)


def _shuffling_sampler(loader: Any) -> str | None:
    """The name of a ``DataLoader``'s sampler if it draws a new order every pass."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    sampler = loader.sampler
    if isinstance(sampler, (RandomSampler, WeightedRandomSampler)):
        return type(sampler).__name__
    if type(sampler).__name__ == "SubsetRandomSampler":
        return "SubsetRandomSampler"
    return None


def _partial_pass(loader: Any, num_batches: int | None) -> str | None:
    """Why a pass may miss samples (``None``: every pass holds every sample)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        if num_batches is not None:
            return f"num_batches={num_batches} takes only the first batches"
        return None
    sampler = loader.sampler
    if isinstance(sampler, WeightedRandomSampler) or (
        isinstance(sampler, RandomSampler)
        and (sampler.replacement or sampler.num_samples != len(sampler.data_source))
    ):
        return "its sampler draws with replacement or a subset of the samples"
    size = len(loader.dataset)  # type: ignore[arg-type]
    if loader.drop_last and loader.batch_size and size % loader.batch_size:
        return (
            f"drop_last=True drops {size % loader.batch_size} of the {size} samples "
            "(a different remainder every pass)"
        )
    if num_batches is not None and num_batches < len(loader):
        return f"num_batches={num_batches} takes {num_batches} of its {len(loader)} batches"
    return None


# The error of a dataloader that yields nothing when iterated again.
_SPENT = (
    "dataloader yielded batches when first iterated but none when iterated again: it can be "
    "iterated only once (e.g. its __iter__ returns a spent generator), and every product "
    "makes a new pass. Pass a list, a DataLoader, or a zero-argument function returning a "
    "fresh iterable."
)
_EMPTY = object()

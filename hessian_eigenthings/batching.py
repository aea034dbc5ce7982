"""Deprecated 1.0.0a5 batching helpers, kept so that scripts importing them still run.

Data operators now iterate, move, split and weight batches themselves (see
:class:`~hessian_eigenthings.operators.data_operator.DataCurvatureOperator`): batches are
weighted by their sample (or token) counts and microbatches give exactly the un-split
operator. These three functions behave as in 1.0.0a5 and warn on use.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from hessian_eigenthings._compat import deprecated

__all__ = ["assert_microbatch_safe", "iterate_batches", "move_batch_to_device"]


def iterate_batches(source: Iterable[Any], num_batches: int | None = None) -> Iterator[Any]:
    """Yield the batches of ``source``, at most ``num_batches`` of them."""
    deprecated(
        "hessian_eigenthings.batching.iterate_batches",
        "itertools.islice(loader, num_batches), or the operators' num_batches= option",
    )
    return iter(source) if num_batches is None else itertools.islice(source, num_batches)


def move_batch_to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of a (nested tuple / list / dict) batch to ``device``."""
    deprecated(
        "hessian_eigenthings.batching.move_batch_to_device",
        "nothing: data operators move batches to the model's device themselves",
    )
    return _move(batch, torch.device(device))


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


def assert_microbatch_safe(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` contains BatchNorm layers (1.0.0a5's guard).

    Today the operators refuse only what is actually wrong, splitting a batch for a
    *train-mode* BatchNorm; in eval mode microbatching is exact.
    """
    deprecated(
        "hessian_eigenthings.batching.assert_microbatch_safe",
        "nothing: operators with microbatch_size raise for train-mode BatchNorm themselves",
    )
    found = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ValueError(
            f"The model contains BatchNorm layers ({shown}); splitting a batch into "
            "microbatches changes their batch statistics in train mode. Call model.eval() "
            "(then microbatching is exact) or drop microbatch_size."
        )

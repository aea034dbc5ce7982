"""Every cross-rank step of the distributed operators, in one place.

The operators decide together or not at all: a decision one rank takes alone (an error
at construction, a random loss, a non-finite product) would leave the other ranks
waiting in the next collective. Each helper here is one small collective on the
group's communication device; the operators issue no other collective of their own
(FSDP's all-gathers and reduce-scatters inside the model's passes are FSDP's).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from hessian_eigenthings.backends.distributed import collective_device

__all__ = [
    "agree_on_build",
    "any_across_ranks",
    "gather_ints",
    "gather_objects",
    "raise_on_every_rank",
    "require_process_group",
    "sum_across_ranks",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup (None means the default group)


def require_process_group(owner: str) -> None:
    """Raise unless ``torch.distributed`` is initialised (before any collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{owner} needs an initialised torch.distributed process group. Call "
            "torch.distributed.init_process_group(...) first (under torchrun), or use the "
            "single-process operator."
        )


def sum_across_ranks(buf: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``buf`` summed over the ranks, in place (one ``all_reduce``)."""
    dev = collective_device(group, buf.device)
    if dev == buf.device:
        dist.all_reduce(buf, group=group)
        return buf
    moved = buf.to(dev)
    dist.all_reduce(moved, group=group)
    return buf.copy_(moved)


def any_across_ranks(flags: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Elementwise: whether any rank's flag is set (one ``all_reduce`` of ints, on the host)."""
    dev = collective_device(group, flags.device)
    t = flags.to(device=dev, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.cpu().bool()


def gather_objects(obj: Any, group: ProcessGroup) -> list[Any]:
    """Every rank's picklable ``obj``, in group rank order (for error reports only)."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_ints(row: list[int], group: ProcessGroup, device: torch.device) -> list[list[int]]:
    """Every rank's list of ints (same length on every rank), in group rank order."""
    return _gather_rows(row, group, device)


def _gather_rows(row: list[int], group: ProcessGroup, device: torch.device) -> list[list[int]]:
    local = torch.tensor(row, dtype=torch.int64, device=collective_device(group, device))
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return [[int(x) for x in t.tolist()] for t in parts]


def _settle(owner: str, error: BaseException | None, rows: list[list[int]], what: str) -> None:
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(rows) if row[0] == 0]
    if failed:
        raise RuntimeError(
            f"{owner}: rank(s) {failed} of the process group failed to {what} (see their "
            "error); no rank can compute a distributed product."
        )


def raise_on_every_rank(
    owner: str,
    error: BaseException | None,
    group: ProcessGroup,
    device: torch.device,
    *,
    what: str,
) -> None:
    """Make a step that failed on some ranks fail on every rank (one ``all_gather``).

    A rank that failed re-raises its own error; the others raise a ``RuntimeError``
    naming the ranks that failed, ``what`` saying which step (e.g. ``"build their
    operator"``).
    """
    _settle(owner, error, _gather_rows([int(error is None)], group, device), what)


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def agree_on_build(
    operator: Any, error: BaseException | None, group: ProcessGroup, device: torch.device
) -> None:
    """After construction: every rank built its operator, and all agree on it.

    One ``all_gather`` of four integers per rank (built, size, hash of the dtype, hash
    of the parameter names and shapes). If any rank failed, or they disagree, every
    rank raises: the failing rank its own error, the others a ``RuntimeError`` naming
    it; a disagreement is a ``ValueError`` saying which field differs where.
    """
    owner = type(operator).__name__
    if error is None:
        layout = operator.layout
        shapes = ";".join(f"{n}:{tuple(s)}" for n, s in zip(layout.names, layout.shapes))
        mine = [1, operator.size, _crc(str(operator.dtype)), _crc(shapes)]
    else:
        mine = [0, -1, 0, 0]
    rows = _gather_rows(mine, group, device)
    _settle(owner, error, rows, "build their operator")
    for field, idx in (("size", 1), ("dtype", 2), ("parameter names and shapes", 3)):
        values = [row[idx] for row in rows]
        if len(set(values)) > 1:
            shown = (
                ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                if field == "size"
                else f"ranks {[r for r, v in enumerate(values) if v != values[0]]} differ "
                f"from rank 0; this rank has {operator.dtype if idx == 2 else 'its own'}"
            )
            raise ValueError(
                f"{owner}: ranks disagree on the operator's {field} ({shown}). Every rank "
                "must build the same model with the same param_filter and dtype; only the "
                "data may differ."
            )

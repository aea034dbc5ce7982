"""Devices compared by what they denote, not by how they were spelled.

``torch.device("cuda")`` and ``torch.device("cuda", 0)`` denote the same GPU when GPU 0
is the current one, yet compare unequal; a tensor on that GPU always reports
``cuda:0``. Likewise ``"cpu:0"`` and ``"cpu"`` are the same memory, but a CPU tensor
reports ``cpu``. Every device the library stores or compares goes through
:func:`canonical_device` (an accelerator without an index gets the current index of its
type, a CPU device loses its index), and :func:`same_device` compares two of them.

:func:`local_accelerator` picks this process's GPU in a ``torchrun`` job: the process
group's bound device, else the device the process selected, else its local rank.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["canonical_device", "host_zeros", "local_accelerator", "pins_for", "same_device"]


def canonical_device(device: torch.device | str | int) -> torch.device:
    """``device`` as a tensor on it reports it: ``cpu`` without index, accelerators with one.

    Args:
        device: A ``torch.device``, a string such as ``"cuda"``, ``"cuda:1"``, ``"cpu:0"``,
            or an int (a CUDA index, as ``torch.device`` reads it).

    Returns:
        ``torch.device("cpu")`` for any CPU device; ``torch.device(type, index)`` with the
        current index of that device type when no index was given (for example
        ``cuda`` -> ``cuda:0`` while GPU 0 is current); other devices unchanged.
    """
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.index is None and dev.type not in ("meta",):
        module = getattr(torch, dev.type, None)
        current = getattr(module, "current_device", None)
        available = getattr(module, "is_available", None)
        if callable(current) and callable(available) and available():
            index = current()
            if isinstance(index, int):
                return torch.device(dev.type, index)
    return dev


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether ``a`` and ``b`` denote one device (``cuda`` vs ``cuda:0``, ``cpu:0`` vs ``cpu``)."""
    return canonical_device(a) == canonical_device(b)


def pins_for(store: torch.device, compute: torch.device) -> bool:
    """Whether a buffer on ``store`` that feeds products on ``compute`` should be pinned.

    Host memory that is copied to and from a CUDA device every product (a Lanczos basis
    held with ``basis_device="cpu"``) is page-locked, so the copies run at full PCIe
    speed without a staging copy; nothing else is (pinned memory is a scarce resource).
    """
    return canonical_device(store).type == "cpu" and canonical_device(compute).type == "cuda"


def host_zeros(
    shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device, serves: torch.device
) -> torch.Tensor:
    """``torch.zeros(shape)`` on ``device``, pinned when it feeds a CUDA ``serves`` device."""
    return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pins_for(device, serves))


def local_accelerator(process_group: Any = None) -> torch.device:
    """This process's CUDA device for collectives of ``process_group``.

    In order: the device the group was bound to (``init_process_group(device_id=...)``);
    the device this process selected with ``torch.cuda.set_device`` (a current device
    other than 0); ``LOCAL_RANK`` (set by ``torchrun``) modulo the visible devices, the
    same guess NCCL makes for an unbound group; else the current device. Never "GPU 0
    for every rank" merely because no rank called ``set_device``.
    """
    bound = _bound_device(process_group)
    if bound is not None and bound.type == "cuda":
        return canonical_device(bound)
    current = torch.cuda.current_device()
    if current != 0:
        return torch.device("cuda", current)
    local_rank = os.environ.get("LOCAL_RANK")
    count = torch.cuda.device_count()
    if local_rank is not None and local_rank.isdigit() and count > 0:
        return torch.device("cuda", int(local_rank) % count)
    return torch.device("cuda", current)


def _bound_device(process_group: Any) -> torch.device | None:
    import torch.distributed as dist

    group = process_group
    if group is None:
        get_default = getattr(dist.distributed_c10d, "_get_default_group", None)
        if get_default is None:
            return None
        try:
            group = get_default()
        except (RuntimeError, ValueError):
            return None
    bound = getattr(group, "bound_device_id", None)
    return bound if isinstance(bound, torch.device) else None

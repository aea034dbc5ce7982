"""Count host synchronisations and host-to-device copies made by a block of code.

On a GPU both stall the host: reading device values (``.item()``, ``bool(t)``,
``float(t)``, ``int(t)``, which end in ``aten._local_scalar_dense``; ``.tolist()``; a copy
to the host) waits for the stream, and copying pageable host memory to the device
(``torch.tensor(x, device=...)``, ``cpu_tensor.to(device)``) waits for the copy. CPU tests
see the same calls with tensors on the ``meta`` device standing in for the accelerator:
a copy of host data to ``meta`` is a host-to-device copy, and a scalar read of a meta
tensor (which has no values) is counted before it fails.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def _devices(tree: Any) -> set[str]:
    return {x.device.type for x in tree_leaves(tree) if isinstance(x, torch.Tensor)}


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as c: ...`` then ``c.syncs``, ``c.host_to_device``.

    ``syncs`` counts scalar reads, ``tolist`` calls (on any device: on CPU they read
    memory directly, on a GPU they copy to the host first) and device-to-host copies.

    ``c.events`` lists what was counted (op name and devices), for failure messages.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0
        self.host_to_device = 0
        self.events: list[str] = []
        self._patches: list[tuple[str, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
            self.events.append(f"scalar read of a {_devices(args)} tensor")
        if func in _COPIES:  # counted before the copy runs (a copy out of meta fails)
            if func is torch.ops.aten.copy_.default:
                src, dst = args[1].device, args[0].device
            else:
                src = args[0].device
                dst = torch.device(kwargs.get("device") or src)
            if src.type == "cpu" and dst.type != "cpu":
                self.host_to_device += 1
                self.events.append(f"{func} cpu -> {dst.type}")
            elif src.type != "cpu" and dst.type == "cpu":
                self.syncs += 1
                self.events.append(f"{func} {src.type} -> cpu")
        out = func(*args, **kwargs)
        return out

    def _wrap(self, name: str) -> None:
        original = getattr(torch, name)

        def counted(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(data, *args, **kwargs)
            from_host = not isinstance(data, torch.Tensor) or data.device.type == "cpu"
            if from_host and out.device.type != "cpu":
                self.host_to_device += 1
                self.events.append(f"torch.{name}(host data, device={out.device.type})")
            return out

        self._patches.append((name, original))
        setattr(torch, name, counted)

    def _wrap_tolist(self) -> None:
        original = torch.Tensor.tolist

        def counted(tensor: torch.Tensor) -> Any:
            self.syncs += 1
            self.events.append(f"tolist of a {tensor.device.type} tensor")
            return original(tensor)

        self._tolist = original
        torch.Tensor.tolist = counted  # type: ignore[method-assign]

    def __enter__(self) -> HostSyncCounter:
        # tensors made from Python data bypass dispatch modes: count them at the API
        self._wrap("tensor")
        self._wrap("as_tensor")
        self._wrap_tolist()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in reversed(self._patches):
            setattr(torch, name, original)
        self._patches.clear()
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]

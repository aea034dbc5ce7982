"""Graphs kept alive between products (``keep_graphs=True``), and the check that they still hold.

A data operator's product on a (micro)batch starts with work that depends on the model
and the batch only (the forward pass and, for the Hessian, the first backward with
``create_graph=True``). For data that fits in memory, keeping that graph for every
(micro)batch lets later products skip it. A kept graph is only valid for the
parameters, the mode and the data it was built with, so every product first checks
that nothing changed underneath: each parameter of the model is the same tensor, with
the same storage and the same version counter (PyTorch increments ``_version`` on every
in-place write, as an optimizer step or ``load_state_dict`` does), every buffer holds the
same values (compared with a copy: BatchNorm updates its running statistics without
incrementing their versions), every module is in the same train/eval mode, and every
tensor of the kept batches has the same version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from hessian_eigenthings.operators._data import Piece

__all__ = ["GraphCache"]

T = TypeVar("T")


def _tensors(batch: Any) -> list[torch.Tensor]:
    """Every tensor inside a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):  # dict, BatchEncoding
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _tensors(v)]
    return []


class GraphCache:
    """The kept pieces and per-piece graphs of one operator, with their validity check.

    Args:
        model: The user's model, whose parameters and modes the kept graphs depend on.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pieces: list[Piece] | None = None  # set once a whole product has read them
        self._states: dict[tuple[int, int], Any] = {}
        self._params: list[tuple[str, nn.Parameter, int, int]] = []
        self._buffers: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._modes: list[tuple[str, nn.Module, bool]] = []
        self._data: list[tuple[int, int, torch.Tensor, int]] = []

    def get(self, key: tuple[int, int], build: Callable[[], T]) -> T:
        """The kept state of piece ``key`` (``(batch, microbatch)``), built on first use."""
        if not self._states:
            self._record_model()
        if key not in self._states:
            self._states[key] = build()
        return self._states[key]

    def seal(self, pieces: list[Piece]) -> None:
        """After the first complete product: keep its pieces and their tensors' versions."""
        self.pieces = pieces
        self._data = [
            (p.batch_index, p.microbatch_index, t, t._version)
            for p in pieces
            for t in _tensors(p.data)
        ]

    def clear(self) -> None:
        """Forget everything (the next product reads the loader and builds again)."""
        self.pieces = None
        self._states.clear()
        self._params, self._buffers, self._modes, self._data = [], [], [], []

    @contextmanager
    def forget_on_error(self) -> Iterator[None]:
        """Clear a cache that a failing (first) product left half built."""
        try:
            yield
        except BaseException:
            if self.pieces is None:
                self.clear()
            raise

    def _record_model(self) -> None:
        self._params = [
            (name, p, p.data_ptr(), p._version) for name, p in self.model.named_parameters()
        ]
        self._buffers = [(n, b, b.detach().clone()) for n, b in self.model.named_buffers()]
        self._modes = [(name, m, m.training) for name, m in self.model.named_modules()]

    def check(self, owner: str) -> None:
        """Raise if the model or the kept data changed since the graphs were built."""
        current = dict(self.model.named_parameters())
        for name, p, ptr, version in self._params:
            now = current.get(name)
            if now is not p or now.data_ptr() != ptr:
                what = f"parameter {name!r} was replaced"
            elif p._version != version:
                what = f"parameter {name!r} was modified in place"
            else:
                continue
            self._refuse(owner, what)
        if len(current) != len(self._params):
            self._refuse(owner, "the model's set of parameters changed")
        for name, b, saved in self._buffers:
            if b.shape != saved.shape:
                self._refuse(owner, f"buffer {name!r} changed shape")
        if self._buffers:  # one host synchronisation for all of them
            flags = [(b != saved).any() for _, b, saved in self._buffers]
            device = flags[0].device
            changed = torch.stack([f.to(device) for f in flags]).tolist()
            for (name, _, _), differs in zip(self._buffers, changed):
                if differs:
                    self._refuse(owner, f"buffer {name!r} changed")
        for name, m, training in self._modes:
            if m.training != training:
                mode = "train" if m.training else "eval"
                self._refuse(owner, f"module {name or '<root>'} switched to {mode} mode")
        for batch, micro, t, version in self._data:
            if t._version != version:
                self._refuse(
                    owner, f"a tensor of batch {batch} (microbatch {micro}) changed in place"
                )

    @staticmethod
    def _refuse(owner: str, what: str) -> None:
        raise RuntimeError(
            f"{owner}(keep_graphs=True): {what} since the kept graphs were built, so they "
            "no longer describe the model on its data. Call operator.release_graphs() to "
            "rebuild them at the next product, or build a new operator."
        )

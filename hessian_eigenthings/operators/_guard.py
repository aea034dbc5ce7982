"""A guard that leaves the user's model exactly as it found it.

Restored on exit, also when the body raises: parameter values (bit for bit, when asked
to snapshot them), ``requires_grad`` flags, ``.grad`` tensors, every module's training
flag, and every buffer (BatchNorm running statistics change in train-mode forwards).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["preserve_model_state"]


@contextmanager
def preserve_model_state(
    model: nn.Module,
    *,
    snapshot_params: Sequence[nn.Parameter] = (),
    only_grad_for: Sequence[nn.Parameter] | None = None,
) -> Iterator[None]:
    """Context manager restoring ``model``'s observable state on exit.

    Args:
        model: The user's module.
        snapshot_params: Parameters whose *values* the body may change (finite
            differences); they are copied and written back exactly.
        only_grad_for: If given, every other parameter has ``requires_grad`` switched off
            inside the block, so autograd builds no graph for it.

    Buffers are written back only where their values changed (decided with one host
    synchronisation for all of them; every product ends in one anyway), so unchanged
    buffers keep their version counters and graphs kept between products that saved
    them (eval-mode BatchNorm statistics) stay usable. Values, not versions, decide:
    BatchNorm updates its running statistics without incrementing their versions.
    """
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    values = [(p, p.detach().clone()) for p in snapshot_params]
    try:
        if only_grad_for is not None:
            keep = {id(p) for p in only_grad_for}
            for p in params:
                if p.requires_grad and id(p) not in keep:
                    p.requires_grad_(False)
        yield
    finally:
        with torch.no_grad():
            for p, saved in values:
                p.copy_(saved)
            same = [(b, s) for b, s in buffers if b.shape == s.shape]
            if same:
                flags = [(b != s).any() for b, s in same]
                changed = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
                for (b, saved_b), write in zip(same, changed):
                    if write:
                        b.copy_(saved_b)
        # Assign only what changed: setters of .grad and Module attributes are not free.
        for p, req, g in zip(params, requires, grads):
            if p.requires_grad != req:
                p.requires_grad_(req)
            if p.grad is not g:
                p.grad = g
        for m, training in modes:
            if m.training != training:
                m.training = training

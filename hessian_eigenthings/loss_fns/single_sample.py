r"""Losses of one un-batched sample (the 1.0.0a5 empirical-Fisher interface), vectorised.

Release 1.0.0a5's ``EmpiricalFisherOperator`` took ``per_sample_loss_fn(model, sample)``:
the scalar loss of a *single* sample whose batch dimension had been stripped, evaluated
for every sample of a batch with :func:`torch.func.vmap`. Today's operator takes
``loss_fn(model, batch) -> (B,)``, the per-sample losses of the whole batch.
:class:`SingleSampleLoss` turns the former into the latter,

.. math::

    \ell(\text{model}, \text{batch}) = \big(f(\text{model}, s_1), \dots,
    f(\text{model}, s_B)\big),

with ``s_i`` the ``i``-th slice of every tensor of the batch along ``sample_dim``, one
vectorised call (no Python loop over samples). Forward-mode AD and ``torch.func`` compose
with it, so the empirical Fisher is exact. Modules whose forward is not vmappable
(train-mode BatchNorm, data-dependent control flow) raise inside ``vmap``; write the
batched per-sample loss directly for those.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from hessian_eigenthings._compat import Translation, deprecated

__all__ = ["SingleSampleLoss", "legacy_fisher_loss"]

_FISHER_REPLACEMENT = (
    "EmpiricalFisherOperator(model, dataloader, loss_fn) with loss_fn(model, batch) returning "
    "the batch's per-sample losses of shape (B,), e.g. "
    "supervised_loss(nn.CrossEntropyLoss(reduction='none'))"
)


def _in_dims(batch: Any, sample_dim: int) -> Any:
    """``vmap`` in_dims mirroring ``batch``: ``sample_dim`` for tensors, ``None`` otherwise."""
    if isinstance(batch, torch.Tensor):
        return sample_dim if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        return {k: _in_dims(v, sample_dim) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_in_dims(v, sample_dim) for v in batch)
    return None


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _tensors(v)]
    return []


class SingleSampleLoss:
    """A loss ``fn(model, sample) -> scalar`` of one un-batched sample.

    Calling it evaluates ``fn`` on one sample (as in 1.0.0a5); :meth:`batched` evaluates
    it on every sample of a batch at once.

    Args:
        fn: ``(model, sample) -> 0-d tensor``; ``sample`` is the batch with the sample
            dimension removed from every tensor.
        sample_dim: Dimension of the batch's tensors that indexes samples.
    """

    def __init__(self, fn: Callable[[nn.Module, Any], torch.Tensor], *, sample_dim: int = 0):
        if not callable(fn):
            raise TypeError(f"fn must be callable (model, sample) -> loss, got {fn!r}.")
        if not isinstance(sample_dim, int) or isinstance(sample_dim, bool):
            raise TypeError(f"sample_dim must be an int, got {sample_dim!r}.")
        self.fn = fn
        self.sample_dim = sample_dim

    def __call__(self, model: nn.Module, sample: Any) -> torch.Tensor:
        return self.fn(model, sample)

    def batched(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The ``(B,)`` per-sample losses of ``batch``, by :func:`torch.func.vmap`."""
        in_dims = _in_dims(batch, self.sample_dim)

        def one(sample: Any) -> torch.Tensor:
            loss = self.fn(model, sample)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)
                raise ValueError(
                    f"A single-sample loss must return a scalar for one sample, got {got}."
                )
            return loss

        out: torch.Tensor = torch.func.vmap(one, in_dims=(in_dims,))(batch)
        return out

    def num_samples(self, batch: Any) -> int:
        """Number of samples of ``batch``: the size of its first tensor along ``sample_dim``."""
        for leaf in _tensors(batch):
            if leaf.dim() > 0:
                return int(leaf.shape[self.sample_dim])
        raise ValueError(
            f"Cannot count the samples of a {type(batch).__name__}: it holds no tensor with a "
            "sample dimension."
        )

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        return f"SingleSampleLoss({name}, sample_dim={self.sample_dim})"


def legacy_fisher_loss(owner: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Translation:
    """Translate 1.0.0a5's ``EmpiricalFisherOperator`` arguments (for ``legacy_keywords``).

    ``per_sample_loss_fn=f`` becomes ``loss_fn`` = the batched per-sample losses of
    ``SingleSampleLoss(f)``. A :class:`SingleSampleLoss` passed as ``loss_fn`` (what
    ``supervised_per_sample_loss`` returns) is batched too, and so is a positional loss
    given together with the 1.0.0a5 ``sample_dim=`` (only a single-sample loss has one).
    """
    # args = (self, model, dataloader, loss_fn) at most
    sample_dim = kw.pop("sample_dim", None)
    if "per_sample_loss_fn" in kw:
        if "loss_fn" in kw or len(args) > 3:
            raise TypeError(
                f"{owner}() got both loss_fn and the 1.0.0a5 per_sample_loss_fn; pass only "
                "loss_fn (the per-sample losses of the batch, shape (B,))."
            )
        deprecated(f"{owner}(per_sample_loss_fn=...)", _FISHER_REPLACEMENT, stacklevel=4)
        fn = kw.pop("per_sample_loss_fn")
        single = fn if isinstance(fn, SingleSampleLoss) else SingleSampleLoss(fn)
    else:
        loss = args[3] if len(args) > 3 else kw.get("loss_fn")
        if isinstance(loss, SingleSampleLoss):
            single = loss
        elif sample_dim is not None:
            single = SingleSampleLoss(loss)  # type: ignore[arg-type]
        else:
            return args, None
    if sample_dim is not None:
        deprecated(f"{owner}(sample_dim=...)", _FISHER_REPLACEMENT, stacklevel=4)
        single = SingleSampleLoss(single.fn, sample_dim=sample_dim)
        if kw.get("weight_fn") is None:  # samples are counted along sample_dim, not dim 0
            kw["weight_fn"] = single.num_samples
    kw["loss_fn"] = single.batched
    return args[:3], None

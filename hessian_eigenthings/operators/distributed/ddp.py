r"""Data-parallel curvature operators: each rank holds a shard of the data.

With ranks :math:`r = 1..R`, each holding batches :math:`b \in B_r` with weights
:math:`w_b` (samples, or non-ignored tokens) and per-batch mean-loss curvature
:math:`C_b`, the operator is the curvature of the mean loss over the union of all
shards,

.. math::

    C v = \frac{\sum_r \sum_{b \in B_r} w_b \, C_b v}{\sum_r \sum_{b \in B_r} w_b},

which is exactly what the single-process operator computes on the union of the shards,
also when the shards are uneven. Every rank runs the shared data loop of
:class:`~hessian_eigenthings.operators.data_operator.DataCurvatureOperator` on its own
batches, producing the partial sum :math:`s_r = \sum_{b \in B_r} w_b C_b v` and weight
:math:`W_r`; one ``all_reduce`` of the flat buffer :math:`[s_r, W_r]` (``n + 1``
entries) then gives every rank :math:`\sum_r s_r` and :math:`\sum_r W_r`. That is the
only collective of a matvec. A block of ``b`` vectors (``matmat``, and every algorithm's
probe blocks) is one pass over each rank's data and one ``all_reduce`` of ``b n + 1``
entries.

The vector is replicated: every rank holds the whole parameter vector and gets the
same product, so any algorithm runs unchanged with a
:class:`~hessian_eigenthings.backends.distributed.ReplicatedBackend` (the default), whose
generator broadcasts the seed from the first rank so probes and start vectors agree
(also for ``seed=None``).

``DistributedDataParallel`` models: the operator works on the wrapped ``.module``
(parameters, names, forward), so DDP's forward (buffer broadcast) and its gradient
hooks never run, and no collective other than the one above is issued; the loss
function must therefore use the model it is given, not a captured DDP wrapper.
Parameter names for ``param_filter`` are those of the inner module (no ``module.``
prefix). As a safety net every matvec runs inside the wrapper's ``no_sync()``.
Nothing about the user's model (wrapper or inner module) is changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hessian_eigenthings._deprecation import renamed_attributes
from hessian_eigenthings.backends.distributed import ReplicatedBackend
from hessian_eigenthings.operators.data_operator import DataCurvatureOperator
from hessian_eigenthings.operators.distributed._collectives import (
    agree_on_build,
    gather_ints,
    require_process_group,
    sum_across_ranks,
)
from hessian_eigenthings.operators.fisher import EmpiricalFisherOperator, MCFisherOperator
from hessian_eigenthings.operators.ggn import GGNOperator
from hessian_eigenthings.operators.hessian import HessianOperator

__all__ = [
    "DDPCurvatureOperator",
    "DDPEmpiricalFisherOperator",
    "DDPGGNOperator",
    "DDPHessianOperator",
    "DDPMCFisherOperator",
    "unwrap_ddp",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup (None means the default group)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class DDPCurvatureOperator(DataCurvatureOperator):
    r"""Base of the data-parallel operators: a data operator whose ranks share one product.

    A subclass lists it first in its bases, before the single-process operator:
    ``class DDPMyOperator(DDPCurvatureOperator, MyOperator)`` (cooperative multiple
    inheritance; formerly named ``DDPOperatorMixin``). It takes the arguments of the
    single-process operator plus ``process_group``, and replaces the (identity)
    cross-process reduction of the data loop by one ``all_reduce`` of
    ``[partial sum, weight]``.

    Construction is collective: after each rank built its operator, one ``all_gather``
    of four integers (built ok, size, dtype, hash of parameter names and shapes)
    checks that all ranks agree; on a mismatch, or if any rank failed to build, every
    rank raises (instead of hanging in the first matvec).

    The vector passed to ``matvec`` must be the same on every rank (the algorithms
    guarantee it through the :class:`ReplicatedBackend`); the result is then the same
    on every rank. If every rank holds only empty batches the total weight is zero and
    the product is the zero vector.

    :class:`DDPMCFisherOperator` adds what the Monte-Carlo Fisher needs on top: its labels
    are keyed by the seed and each sample's contents, so the ranks agree on the seed.

    Precision: the weight travels in the buffer's dtype (the vector dtype, at least
    float32), exact up to :math:`2^{24}` samples in float32 and :math:`2^{53}` in
    float64; reduced-precision vectors are reduced in float32.
    """

    def __init__(
        self,
        model: nn.Module,
        *args: Any,
        process_group: ProcessGroup = None,
        **kwargs: Any,
    ) -> None:
        require_process_group(type(self).__name__)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.process_group = process_group
        self.ddp_model = model
        inner = unwrap_ddp(model)
        error: BaseException | None = None
        try:
            backend = kwargs.get("backend")
            if backend is None:
                kwargs["backend"] = ReplicatedBackend(process_group)
            elif not isinstance(backend, ReplicatedBackend):
                raise TypeError(
                    f"{type(self).__name__} needs a backend that keeps vectors identical on every "
                    f"rank (a ReplicatedBackend, the default), got {backend!r}: with a per-process "
                    "backend, seed=None draws different start vectors per rank and the all-reduced "
                    "products mix them. Drop the backend argument."
                )
            _reject_sync_batchnorm(inner)
            super().__init__(inner, *args, **kwargs)
        except Exception as err:
            error = err
        first = next(inner.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        agree_on_build(self, error, process_group, device)

    # -- the one collective --------------------------------------------------------------
    def _reduce(
        self, total: torch.Tensor, weight: int | torch.Tensor
    ) -> tuple[torch.Tensor, int | torch.Tensor]:
        comm_dtype = total.dtype if torch.finfo(total.dtype).bits >= 32 else torch.float32
        buf = torch.empty(total.numel() + 1, dtype=comm_dtype, device=total.device)
        buf[:-1].copy_(total.reshape(-1))
        if isinstance(weight, torch.Tensor):
            buf[-1:].copy_(weight.reshape(1))
        else:
            buf[-1] = weight
        sum_across_ranks(buf, self.process_group)
        return buf[:-1].view(total.shape).to(total.dtype), buf[-1]

    @contextmanager
    def _wrapper_quiet(self) -> Iterator[None]:
        ctx = (
            self.ddp_model.no_sync()
            if isinstance(self.ddp_model, DistributedDataParallel)
            else nullcontext()
        )
        with ctx:
            yield

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        with self._wrapper_quiet():
            return super()._matmat(V)


def _reject_sync_batchnorm(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.SyncBatchNorm) and m.training:
            raise ValueError(
                f"{name} is a SyncBatchNorm in train mode: its forward all-gathers batch "
                "statistics across ranks, which would make the curvature depend on how the data "
                "is split (and hang when ranks hold different numbers of batches). Call "
                "model.eval() before building the operator."
            )


class DDPHessianOperator(DDPCurvatureOperator, HessianOperator):
    r"""Hessian of the mean loss over the union of every rank's data shard.

    Takes every argument of :class:`~hessian_eigenthings.operators.hessian.HessianOperator`
    (``model, dataloader, loss_fn``, then keyword options) plus ``process_group``
    (default: the default group). ``dataloader`` yields this rank's shard; shards may
    differ in size and number of batches. ``model`` may be a
    ``DistributedDataParallel`` wrapper or a plain module (identical on every rank).

    .. math::

        H v = \frac{1}{W} \sum_r \sum_{b \in B_r} w_b \, \nabla^2 L_b(\theta)\, v,
        \qquad W = \sum_r \sum_{b \in B_r} w_b,

    computed with one ``all_reduce`` of ``size + 1`` entries per matvec. Both
    ``method="autograd"`` and ``"finite_difference"`` are supported.

    Example (under ``torchrun``)::

        H = DDPHessianOperator(ddp_model, my_shard_loader, loss_fn)
        eigenvalues, eigenvectors = lanczos(H, k=5)  # same result on every rank
    """


class DDPGGNOperator(DDPCurvatureOperator, GGNOperator):
    r"""Generalized Gauss-Newton of the mean loss over the union of every rank's shard.

    Takes every argument of :class:`~hessian_eigenthings.operators.ggn.GGNOperator`
    (``model, dataloader, forward_fn, loss_of_output_fn``, then keyword options) plus
    ``process_group``. Batches are weighted by ``loss_of_output_fn.batch_weight``
    (non-ignored targets for cross-entropy) or their size, summed over all ranks:

    .. math::

        G v = \frac{1}{W} \sum_r \sum_{b \in B_r} w_b \, J_b^\top H_b J_b v,
        \qquad W = \sum_r \sum_{b \in B_r} w_b,

    with one ``all_reduce`` of ``size + 1`` entries per matvec.
    """


class DDPEmpiricalFisherOperator(DDPCurvatureOperator, EmpiricalFisherOperator):
    r"""Empirical Fisher over the union of every rank's shard: ``(1/N) sum_i g_i g_i^T``.

    Takes every argument of
    :class:`~hessian_eigenthings.operators.fisher.EmpiricalFisherOperator` (``model,
    dataloader, loss_fn`` returning per-sample losses, then keyword options) plus
    ``process_group``. ``N`` counts the samples of all ranks; one ``all_reduce`` of
    ``size + 1`` entries per matvec.
    """


class DDPMCFisherOperator(DDPCurvatureOperator, MCFisherOperator):
    r"""Monte-Carlo Fisher over the union of every rank's shard.

    Takes every argument of :class:`~hessian_eigenthings.operators.fisher.MCFisherOperator`
    (``model, dataloader, forward_fn``, then keyword options) plus ``process_group``. The
    labels of a sample are drawn from a generator keyed by ``(seed, the sample's
    contents)``, so once the ranks agree on the seed the operator is exactly the
    single-process one on the union of the shards:

    .. math::

        \hat F v = \frac{1}{W} \sum_r \sum_{b \in B_r} w_b \, \frac{1}{R_b}
        \sum_{i \in b} J_i^\top \Big( \frac{1}{S} \sum_{s=1}^{S} r_{is}
        \langle r_{is}, J_i v \rangle \Big),

    with one ``all_reduce`` of ``size + 1`` entries per matvec. Construction adds one
    ``all_gather`` of one integer per rank: rank 0's seed becomes every rank's (so
    ``seed=None`` and seeds that differ between ranks agree).
    """

    def __init__(
        self,
        model: nn.Module,
        *args: Any,
        process_group: ProcessGroup = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, process_group=process_group, **kwargs)
        self.seed = gather_ints([self.seed], self.process_group, self.device)[0][0]


__getattr__ = renamed_attributes(
    __name__, {"DDPOperatorMixin": ("DDPCurvatureOperator", lambda: DDPCurvatureOperator)}
)

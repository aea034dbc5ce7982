r"""The shared data-averaging loop behind every model-and-data curvature operator.

For batches (or microbatches) ``b`` with weights ``w_b`` (samples, or non-ignored
tokens) and per-batch mean-loss curvature ``C_b``, every data operator computes

.. math::

    C v = \frac{1}{W} \sum_b w_b \, C_b v, \qquad W = \sum_b w_b,

the curvature of the mean loss over all samples used, never a plain mean over batches.
Subclasses supply only ``C_b v`` (:meth:`DataCurvatureOperator._piece_product`), given
each (micro)batch as a :class:`~hessian_eigenthings.operators._data.Piece` (its data, its
batch and microbatch index, its weight). Data-parallel subclasses override the one
cross-process seam :meth:`DataCurvatureOperator._reduce`; the parameter-sharded operator
also overrides the other seams grouped below it (its passes are collective).

Non-finite products (an overflowing bf16 model, a bad batch) are refused: the loop keeps
one on-device finiteness flag per (micro)batch, and after the reduction one host sync per
matvec checks the sum; if it is not finite, a
:class:`~hessian_eigenthings.errors.NonFiniteError` names the operator, the
batch index (and microbatch) and the parameters whose blocks went non-finite. An
exception raised while a batch is processed (by the loss, the model or the loader) is
re-raised as the same type with the batch index added, the original as its cause.

At construction the operator evaluates the model on the first non-empty (micro)batch
(:meth:`DataCurvatureOperator._construction_probe`): once with autograd, to refuse a
loss or output without a graph (every product would be zero); and, with
``check_determinism=True``, twice more without autograd, to refuse a non-finite or a
random loss, plus once on the two halves of the batch, to warn about a loss summed over
the samples instead of averaged.
"""

from __future__ import annotations

import logging
import math
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import Any, ClassVar, TypedDict

import torch
from torch import nn

from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.backends.single_device import SingleDeviceBackend
from hessian_eigenthings.errors import NonFiniteError
from hessian_eigenthings.operators._aliasing import check_disjoint_for_finite_differences
from hessian_eigenthings.operators._data import (
    BatchSource,
    Piece,
    WeightFn,
    leading_dim,
    split_batch,
)
from hessian_eigenthings.operators._guard import preserve_model_state
from hessian_eigenthings.operators._user_fns import located
from hessian_eigenthings.operators.base import CurvatureOperator
from hessian_eigenthings.param_utils import ParamFilterLike, ParamLayout, select_params

__all__ = ["DataCurvatureOperator", "DataOptions", "determinism_tolerance"]

logger = logging.getLogger("hessian_eigenthings")

_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

# Two evaluations of the loss may differ by reduction-order noise (GPU kernels with
# atomics: index_add_, scatter, some cuDNN algorithms), a few units in the last place of
# the model's dtype; random modules (dropout) change a loss by far more. Differences up to
# ``min(_NOISE_ULPS * eps, _NOISE_CAP)`` relative are accepted as noise, unless a
# dropout-like module is active (then any difference raises).
_NOISE_ULPS = 64
_NOISE_CAP = 1e-3


def determinism_tolerance(dtype: torch.dtype) -> float:
    """Relative difference of two loss evaluations accepted as reduction-order noise.

    ``min(64 eps, 1e-3)`` for the machine epsilon ``eps`` of ``dtype``: 7.6e-6 in
    float32, 1.4e-14 in float64, 1e-3 in bfloat16 / float16.
    """
    return min(_NOISE_ULPS * float(torch.finfo(dtype).eps), _NOISE_CAP)


def _stochastic_modules(model: nn.Module) -> list[str]:
    """Names of modules that sample randomness in their current mode (dropout-like)."""
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        p = getattr(m, "p", None)
        if isinstance(m, _RANDOM_MODULES) and isinstance(p, float) and p > 0:
            found.append(f"{name or type(m).__name__} ({type(m).__name__}, p={p})")
        elif not isinstance(m, _RANDOM_MODULES):
            for attr in ("attention_dropout", "attn_dropout", "dropout"):
                val = getattr(m, attr, None)
                if isinstance(val, float) and val > 0:
                    found.append(f"{name}.{attr}={val}")
    return found


class DataOptions(TypedDict, total=False):
    """The keyword options every data operator takes (see :class:`DataCurvatureOperator`).

    Operators declare them once as ``**options: Unpack[DataOptions]``, so the flat
    keywords (``param_filter=..., microbatch_size=...``) are type-checked everywhere.
    """

    param_filter: ParamFilterLike
    full_dataset: bool
    num_batches: int | None
    microbatch_size: int | None
    weight_fn: WeightFn | None
    check_determinism: bool
    backend: LinAlgBackend | None


class DataCurvatureOperator(CurvatureOperator):
    """Base of operators built from a model, a dataloader and a loss.

    Args:
        model: The ``nn.Module``; never modified (see :func:`preserve_model_state`).
        dataloader: Re-iterable of batches or a zero-argument factory returning one.
        param_filter: Which ``requires_grad`` parameters span the operator (globs, a
            :class:`~hessian_eigenthings.param_utils.ParamFilter`, or a predicate).
        full_dataset: ``True``: each matvec averages over all batches. ``False``: each
            matvec uses the next batch (cycling), a stochastic operator.
        num_batches: Use only the first ``num_batches`` batches.
        microbatch_size: Split batches into pieces of at most this many samples; the
            result equals the un-split one (except for train-mode BatchNorm, which
            raises because batch statistics change with the split).
        weight_fn: ``batch -> number of samples`` (int or 0-d tensor). Default: the
            loss's ``batch_weight`` attribute if it has one (token counts), else the
            leading dimension of the batch.
        loss_for_weights: The loss whose ``batch_weight`` is the default ``weight_fn``
            (for subclasses).
        check_determinism: Evaluate the loss twice on the first batch at construction
            and raise if it is not finite or differs (dropout in train mode makes the
            operator random; differences below :func:`determinism_tolerance`, relative,
            are reduction-order noise and accepted unless a dropout-like module is
            active), and warn if the loss looks summed over the samples (checked only
            with the default sample-count weighting). The check for an autograd graph
            runs either way.
        backend: Vector backend for algorithms.
    """

    #: Whether ``__init__`` evaluates the model on the first batch; operators whose
    #: forwards are collective run :meth:`_check_determinism` after every rank is built.
    _probe_in_init: ClassVar[bool] = True
    #: Whether :meth:`_probe_loss` is the mean loss of the batch (then a summed loss is
    #: detected at construction).
    _probe_is_mean_loss: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        *,
        param_filter: ParamFilterLike = None,
        full_dataset: bool = True,
        num_batches: int | None = None,
        microbatch_size: int | None = None,
        weight_fn: WeightFn | None = None,
        loss_for_weights: Any = None,
        check_determinism: bool = True,
        backend: LinAlgBackend | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.named_params = select_params(model, param_filter)
        self.params = [p for _, p in self.named_params]
        self.layout = ParamLayout.of(self.named_params)
        dtype = self.params[0].dtype
        for p in self.params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        self._dtype = dtype
        self._blocks = self._vector_blocks()
        self._device = self._blocks[0].device
        devices = {b.device for b in self._blocks}
        if len(devices) > 1:
            raise ValueError(
                f"Selected parameters live on several devices {sorted(map(str, devices))}; "
                "a data operator needs them on one device (or use a distributed operator)."
            )
        check_disjoint_for_finite_differences(
            self.named_params, self._snapshot_params(), type(self).__name__
        )
        self.source = BatchSource(
            dataloader,
            full_dataset=full_dataset,
            num_batches=num_batches,
            microbatch_size=microbatch_size,
            device=self._device,
        )
        self._weight_fn: WeightFn = (
            weight_fn or getattr(loss_for_weights, "batch_weight", None) or leading_dim
        )
        self._backend = backend or SingleDeviceBackend()
        if self._probe_in_init:
            self._construction_probe(check_determinism)

    # -- CurvatureOperator ------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def backend(self) -> LinAlgBackend:
        return self._backend

    # -- subclass hooks -----------------------------------------------------------------
    @abstractmethod
    def _piece_product(
        self, piece: Piece, vs: Sequence[torch.Tensor]
    ) -> Sequence[torch.Tensor | None]:
        """``C_b v``: curvature of the mean loss on ``piece.data`` times ``v``.

        ``vs`` holds ``v`` in blocks shaped like :meth:`_vector_blocks` (one per selected
        parameter); the result has one entry per block, ``None`` meaning zero (a
        parameter that does not reach the loss). The loop applies ``piece.weight``.
        """

    @abstractmethod
    def _probe_loss(self, batch: Any) -> torch.Tensor:
        """A scalar that depends on the model's randomness (for the determinism probe)."""

    def _graph_probe(self, batch: Any) -> None:
        """Raise unless what the products differentiate has an autograd graph.

        Called once at construction, with grad enabled and every parameter of the model
        requiring grad; operators check the value of the user's function they
        differentiate (see :func:`~hessian_eigenthings.operators._user_fns.check_graph`).
        """

    def _snapshot_params(self) -> Sequence[nn.Parameter]:
        """Parameters whose values a matvec perturbs (finite differences)."""
        return ()

    def _reduce(
        self, total: torch.Tensor, weight: int | torch.Tensor
    ) -> tuple[torch.Tensor, int | torch.Tensor]:
        """Combine partial sums across processes (identity for one process)."""
        return total, weight

    # -- seams of the parameter-sharded operator (whose passes are collective) -----------
    def _vector_blocks(self) -> list[torch.Tensor]:
        """The tensors a vector is split into, in order (the parameters themselves)."""
        return list(self.params)

    def _guard(self) -> AbstractContextManager[Any]:
        """What restores the user's model after a product, also when it raises.

        It also names the batch in an exception raised inside (see
        :func:`~hessian_eigenthings.operators._user_fns.located`).
        """
        stack = ExitStack()
        stack.enter_context(located(self.source.position, type(self).__name__))
        stack.enter_context(
            preserve_model_state(
                self.model, snapshot_params=self._snapshot_params(), only_grad_for=self.params
            )
        )
        return stack

    def _product_mode(self) -> AbstractContextManager[Any]:
        """Autograd on, also inside a caller's ``no_grad()`` or ``inference_mode()``."""
        stack = ExitStack()
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        return stack

    def _pieces(self) -> Iterator[Piece]:
        """The weighted (micro)batches of one product; those of weight ``0`` are skipped."""
        for batch in self.source.batches():
            parts = self.source.microbatches(batch)
            self._check_microbatch_split(parts)
            for index, data in enumerate(parts):
                w = self._weight(data)
                if not (isinstance(w, int) and w == 0):
                    yield Piece(data, self.source.batch_index, index, w)

    def _weighted_product(
        self, piece: Piece, vs: Sequence[torch.Tensor], like: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """``w_b C_b v / unit`` as a fresh flat vector, and the ``unit`` it still owes.

        Integer weights are owed (the loop scales once, not per batch); tensor weights
        are applied here, and a piece of weight 0 (every token ignored, where the loss
        may be NaN) contributes exactly zero.
        """
        flat = self._flat_product(piece, vs, like)
        w = piece.weight
        if isinstance(w, int):
            return flat, w
        flat.mul_(w.to(flat.dtype)).masked_fill_(w <= 0, 0.0)
        return flat, 1

    def _all_finite(self, total: torch.Tensor, weight: int | torch.Tensor) -> tuple[bool, bool]:
        """Whether the reduced product is finite, and whether the total weight is positive.

        One host sync per matvec: the sum of ``total`` and (for a tensor weight) the
        weight are read together. A sum is much cheaper than an elementwise test; if it
        is not finite (a NaN/inf entry, or only an overflow of the sum itself), the
        exact elementwise test decides. After the reduction every rank of a
        data-parallel operator holds the same ``total``, so every rank decides alike.
        """
        s = total.sum().double()
        if isinstance(weight, torch.Tensor):
            host = torch.stack([s, weight.double().reshape(())]).tolist()
            total_sum, positive = host[0], host[1] > 0
        else:
            total_sum, positive = float(s), weight > 0
        finite = math.isfinite(total_sum) or bool(torch.isfinite(total).all())
        return finite, positive

    # -- the loop ------------------------------------------------------------------------
    def _weight(self, batch: Any) -> int | torch.Tensor:
        w = self._weight_fn(batch)
        if isinstance(w, torch.Tensor):
            if w.dim() != 0:
                raise ValueError(f"weight_fn must return a scalar, got shape {tuple(w.shape)}.")
            return w.to(self._device)
        if not isinstance(w, int) or w < 0:
            raise ValueError(f"weight_fn must return a non-negative int or 0-d tensor, got {w!r}.")
        return w

    def _check_microbatch_split(self, pieces: list[Any]) -> None:
        if len(pieces) > 1:
            for name, m in self.model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                    raise ValueError(
                        f"microbatch_size splits batches but {name or 'the model'} is a "
                        f"{type(m).__name__} in train mode, whose batch statistics depend on the "
                        "split. Call model.eval() or drop microbatch_size."
                    )

    def _split(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """``vec`` as views shaped like :meth:`_vector_blocks`, in their dtypes."""
        sizes = [b.numel() for b in self._blocks]
        return [
            piece.to(b.dtype).view(b.shape)
            for piece, b in zip(torch.split(vec, sizes), self._blocks)
        ]

    def _accumulate(self, vec: torch.Tensor) -> torch.Tensor:
        """``(1/W) sum_b w_b C_b v`` over the batches of one matvec."""
        vs = self._split(vec)
        # ``total`` holds (1/ref) * sum_j w_j C_j v, where ``ref`` is the unit owed by the
        # first product: a single batch then needs no scaling pass at all.
        total: torch.Tensor | None = None
        ref = 1
        weight: int | torch.Tensor = 0
        # (batch index, microbatch index) of every product, and on-device sums of the
        # products (NaN/inf whenever an entry is), taken only when there are several.
        where: list[tuple[int, int]] = []
        sums: list[torch.Tensor] = []
        with self._guard():
            for piece in self._pieces():
                flat, unit = self._weighted_product(piece, vs, vec)
                where.append((piece.batch_index, piece.microbatch_index))
                if total is None:
                    total, ref = flat, unit
                else:
                    if len(sums) == 0:
                        sums.append(total.sum())
                    sums.append(flat.sum())
                    total.add_(flat, alpha=unit / ref)
                weight = weight + piece.weight
            if total is None:
                total = torch.zeros(vec.numel(), dtype=vec.dtype, device=vec.device)
            if type(self)._reduce is not DataCurvatureOperator._reduce and ref != 1:
                total.mul_(ref)  # processes exchange the plain weighted sum
                ref = 1
            total, weight = self._reduce(total, weight)
        # After the reduction, so that every rank agrees; one host sync for both checks.
        finite, positive = self._all_finite(total, weight)
        if not finite:
            flags = sums or [torch.tensor(float("nan"))] * len(where)
            self._raise_non_finite(total, [(b, m, f) for (b, m), f in zip(where, flags)])
        if isinstance(weight, int):
            if weight == 0:
                raise ValueError(
                    "All batches had zero weight (no samples or no non-ignored tokens)."
                )
            return total if ref == weight else total.mul_(ref / weight)
        # Token (or class-weight) counts are tensors: an all-ignored dataset, whose mean
        # loss (and so its curvature) is undefined, is refused.
        if not positive:
            raise ValueError(
                "All batches had zero total weight (every target ignored): the mean loss is "
                "undefined. Check ignore_index / the labels of the dataloader."
            )
        return (
            total.mul_(ref).div_(weight.to(total.dtype))
            if ref != 1
            else total.div_(weight.to(total.dtype))
        )

    def _non_finite_names(self, total: torch.Tensor) -> tuple[str, ...]:
        """Names of the parameters whose blocks of ``total`` are not finite."""
        sizes = [b.numel() for b in self._blocks]
        return tuple(
            name
            for (name, _), block in zip(self.named_params, torch.split(total, sizes))
            if not bool(torch.isfinite(block).all())
        )

    def _raise_non_finite(
        self, total: torch.Tensor, flags: list[tuple[int, int, torch.Tensor]]
    ) -> None:
        bad = [(b, m, "") for b, m, flag in flags if not bool(torch.isfinite(flag))]
        what = (
            None
            if bad
            else "the product summed over another process's batches (this rank's are finite)"
        )
        raise self._non_finite_error(bad, self._non_finite_names(total), what)

    def _non_finite_error(
        self, bad: list[tuple[int, int, str]], names: tuple[str, ...], what: str | None = None
    ) -> NonFiniteError:
        """The error naming the (micro)batches ``(batch, microbatch, suffix)`` and blocks."""
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        if what is None:
            split = self.source.microbatch_size is not None
            where = ", ".join(
                f"{b}" + (f" (microbatch {m})" if split else "") + suffix
                for b, m, suffix in bad[:5]
            )
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            what = f"the product on batch index {where}{more} (loader order)"
        return NonFiniteError(
            f"{type(self).__name__}: {what} is non-finite (inf/nan) in the blocks of the "
            f"parameters {shown}. The loss or its curvature overflowed there (e.g. a bf16 "
            "model, a diverged loss, or bad inputs in that batch); inspect that batch, or "
            "evaluate the model in higher precision.",
            batch_index=bad[0][0] if bad else None,
            param_names=names,
        )

    def _flat_product(
        self, piece: Piece, vs: Sequence[torch.Tensor], like: torch.Tensor
    ) -> torch.Tensor:
        """``C_b v`` as one fresh flat vector of ``like``'s dtype (zeros for unused params)."""
        prods = self._piece_product(piece, vs)
        return torch.cat(
            [
                torch.zeros(b.numel(), dtype=like.dtype, device=like.device)
                if h is None
                else h.reshape(-1).to(like.dtype)
                for h, b in zip(prods, self._blocks)
            ]
        )

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._accumulate(v)

    # -- construction probe ------------------------------------------------------------
    def _probe_piece(self) -> Piece:
        """The first (micro)batch of positive weight, from the start of a pass."""
        for index, batch in self.source.probe_batches():
            parts = self.source.microbatches(batch)
            self._check_microbatch_split(parts)
            for m, data in enumerate(parts):
                w = self._weight(data)
                if (w > 0) if isinstance(w, int) else bool(w > 0):
                    return Piece(data, index, m, w)
        raise ValueError(
            f"{type(self).__name__}: every batch of the dataloader"
            + ("" if self.source.num_batches is None else f" (first {self.source.num_batches})")
            + " has weight 0 (empty batches, or every target ignored): the mean loss, and so "
            "its curvature, is undefined. Check the dataloader and weight_fn / ignore_index."
        )

    def _probe_context(self, piece: Piece) -> ExitStack:
        """Model guard and a forked RNG, naming the batch in errors (the user's kernels)."""
        stack = ExitStack()
        where = f"processing batch index {piece.batch_index} (loader order) at construction"
        stack.enter_context(located(lambda: where, type(self).__name__))
        stack.enter_context(preserve_model_state(self.model))
        cuda = [self._device] if self._device.type == "cuda" else []
        stack.enter_context(torch.random.fork_rng(devices=cuda))
        stack.enter_context(torch.inference_mode(False))
        return stack

    def _construction_probe(self, check_determinism: bool) -> None:
        """Evaluate the model on the first non-empty piece: graph, finiteness, randomness.

        Cost: one forward with autograd (the graph is freed at once); with
        ``check_determinism`` two more forwards without autograd and, for a mean loss
        with the default weights, one over the two halves of the piece.
        """
        piece = self._probe_piece()
        with self._probe_context(piece):
            with torch.enable_grad():
                for p in self.model.parameters():
                    if p.is_floating_point() or p.is_complex():
                        p.requires_grad_(True)  # the guard restores the flags
                self._graph_probe(piece.data)
            if check_determinism:
                self._determinism_checks(piece)

    def _check_determinism(self) -> None:
        """Raise if the loss on the first non-empty piece is not finite or is random."""
        piece = self._probe_piece()
        with self._probe_context(piece):
            self._determinism_checks(piece)

    def _determinism_checks(self, piece: Piece) -> None:
        """Finite, not random, and (for a mean loss with default weights) not summed."""
        value = self._compare_probe_losses(piece)
        if self._probe_is_mean_loss and self._weight_fn is leading_dim:
            self._check_mean_reduction(piece, value)

    def _compare_probe_losses(self, piece: Piece) -> torch.Tensor:
        with torch.no_grad():
            a = self._probe_loss(piece.data)
            b = self._probe_loss(piece.data)
        name = type(self).__name__
        if not bool(torch.isfinite(a)) or not bool(torch.isfinite(b)):
            bad = a if not bool(torch.isfinite(a)) else b
            raise NonFiniteError(
                f"{name}: the loss on batch index {piece.batch_index} (loader order) is "
                f"{bad.item()} at construction, so every product would be non-finite. Inspect "
                "that batch (inf/nan inputs, an empty batch, all targets ignored) or the "
                "model's parameters, or evaluate the model in higher precision.",
                batch_index=piece.batch_index,
            )
        if torch.equal(a, b):
            return a
        va, vb = float(a), float(b)
        tol = determinism_tolerance(self._dtype)
        relative = abs(va - vb) / max(abs(va), abs(vb))
        causes = _stochastic_modules(self.model)
        if relative <= tol and not causes:
            logger.debug(
                "%s: the loss differs by %.2g (relative) between two evaluations, within the "
                "reduction-order noise tolerance %.2g.",
                name,
                relative,
                tol,
            )
            return a
        cause = ", ".join(causes) or "unknown (a module samples random numbers in forward)"
        raise ValueError(
            f"{name}: the loss differs between two evaluations on the same batch ({va:.9g} vs "
            f"{vb:.9g}, relative {relative:.2g}, more than reduction-order noise "
            f"{tol:.2g}{' or any difference with dropout active' if causes else ''}), so the "
            f"curvature would be random. Likely cause: {cause}. Call model.eval() (or set "
            "dropout to 0) before building the operator, or pass check_determinism=False to "
            "accept a stochastic operator."
        )

    def _check_mean_reduction(self, piece: Piece, value: torch.Tensor) -> None:
        """Warn if the piece's loss is the sum of its halves' losses, not their mean."""
        try:
            n = leading_dim(piece.data)
        except ValueError:
            return
        batch_stats = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            for m in self.model.modules()
        )
        if n < 2 or batch_stats:  # halves of a train-mode BatchNorm batch are other losses
            return
        halves = split_batch(piece.data, (n + 1) // 2)
        try:
            with torch.no_grad():
                la, lb = (float(self._probe_loss(h)) for h in halves)
        except Exception as err:  # a heuristic: a model that needs the whole batch skips it
            logger.debug("%s: no reduction check (%s)", type(self).__name__, err)
            return
        wa, wb = (leading_dim(h) for h in halves)
        full = float(value)
        scale = abs(la) + abs(lb)
        if not (math.isfinite(la) and math.isfinite(lb)) or scale == 0.0:
            return
        tol = max(1e-4, 16 * float(torch.finfo(self._dtype).eps)) * scale
        mean = (wa * la + wb * lb) / (wa + wb)
        if abs(full - (la + lb)) <= tol and abs(full - mean) > 100 * tol:
            warnings.warn(
                f"{type(self).__name__}: the loss looks summed over the samples, not averaged: "
                f"on the first batch ({n} samples) it is {full:.6g}, the sum of the losses of "
                f"its two halves ({la:.6g} + {lb:.6g}), not their mean. The operator is the "
                "curvature of the mean loss over all samples and weights each batch by its "
                "size, so a summed loss scales every eigenvalue and the trace by the batch "
                "size. Use reduction='mean' (or divide by the batch size); if the summed loss "
                "is what you mean, pass weight_fn explicitly (e.g. weight_fn=lambda batch: 1) "
                "to silence this check.",
                UserWarning,
                stacklevel=4,
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, dtype={self.dtype}, device={self.device}, "
            f"params={len(self.params)}, full_dataset={self.source.full_dataset})"
        )

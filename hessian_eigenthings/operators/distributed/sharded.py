r"""Hessian of an FSDP2 (``fully_shard``) model whose parameters are sharded across ranks.

Each rank holds only its shard of every parameter (the local tensor of a ``DTensor``
with placement ``Shard(0)`` on a 1-D device mesh) and, correspondingly, only its shard
of every vector: the global vector is the concatenation of the flattened *full*
parameters (in ``named_parameters`` order) and rank ``r`` holds, for each parameter, the
rows FSDP gives it (``torch.chunk`` of dim 0). The operator's
:attr:`~ShardedHessianOperator.backend` is a
:class:`~hessian_eigenthings.backends.distributed.ShardedBackend` over exactly these
index ranges, so ``lanczos``, ``trace`` and ``spectral_density`` run unchanged on the
local shards, with identical scalars (eigenvalues, trace estimates) on every rank.

The matvec is a central finite difference of exact gradients (the approximation
Pearlmutter (1994) improves on; here the baseline that needs only first-order AD):

.. math::

    H v \approx \frac{\|v\|}{2h} \big( g(\theta + h u) - g(\theta - h u) \big),
    \qquad u = v / \|v\|,\quad
    g(\theta) = \nabla_\theta \frac{1}{W} \sum_r \sum_{b \in B_r} w_b L_b(\theta),

with truncation error :math:`O(h^2)`. Only first-order autograd is needed, and it runs
through FSDP's own machinery: the perturbation is applied to the local shards, the
forward all-gathers the perturbed parameters, and the backward reduce-scatters
gradients into sharded ``.grad`` tensors. FSDP's reduce-scatter averages over the
ranks (``gradient_divide_factor``, default the world size), which the operator undoes
before dividing by the global weight :math:`W`.

Exact (double-backward) HVPs: by default FSDP2 frees the all-gathered parameters
after forward and after backward, and routes gradients to the sharded parameters
through hooks (reduce-scatter into ``.grad``), not through the autograd graph (with
torch 2.13, ``torch.autograd.grad`` of a loss with respect to the sharded parameters
returns ``None`` for the parameters of non-root FSDP modules), so a second
differentiation fails on freed storage. It does work when the model keeps its
parameters unsharded through forward and backward (``set_reshard_after_forward(False)``
and ``set_reshard_after_backward(False)``): differentiating twice with respect to the
registered unsharded parameters reproduced the unsharded Hessian-vector product to
1.6e-16 relative in a 2-rank gloo check. That path needs the whole model, the whole
vector and the whole product on every rank during the matvec (ZeRO-2 memory, an
``n``-sized all-reduce), and FSDP has no public getter to restore the user's reshard
settings afterwards, so it is not offered here; finite differences keep FSDP's
parameter-sharded memory profile.

The operator runs the shared data loop of
:class:`~hessian_eigenthings.operators.data_operator.DataCurvatureOperator` (weights,
microbatches, the BatchNorm split check, the model-state guard, non-finite detection)
with the finite-difference product of
:class:`~hessian_eigenthings.operators.hessian.HessianOperator`; its distributed
differences are overrides of the loop's seams: vectors are split into local shards,
the ranks run their passes in lock step, each pass weighs its loss before the
(collective) backward, and the decisions that end a product are taken together.

Communication per product (a matvec, or a block of ``b`` vectors): before each
microbatch round one all-reduce of ``2 + R + b`` float64 numbers (ranks with data left;
the total weight in the last round; each rank's piece weight; the vectors' squared norms
in the first round), i.e. ``P + 1`` small all-reduces for at most ``P`` microbatches on
any rank whatever the block's width, plus FSDP's all-gathers and reduce-scatters for two
forward/backward passes per vector and round (finite differences share no pass between
vectors). Each round reads the small buffer on the host (one synchronisation per
microbatch, negligible next to the collective forward/backward passes). A rank
whose shard of the product is not finite sends NaN as its weight in the last round, so
every rank sees the same verdict without another collective; only then, on the error
path, the ranks gather which of their losses went non-finite to name the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hessian_eigenthings.backends.distributed import ShardedBackend
from hessian_eigenthings.operators._data import Piece, WeightFn
from hessian_eigenthings.operators._finite_difference import perturbed_pair, squared_norm
from hessian_eigenthings.operators._guard import preserve_model_state
from hessian_eigenthings.operators.distributed._collectives import (
    agree_on_build,
    any_across_ranks,
    gather_objects,
    raise_on_every_rank,
    require_process_group,
    sum_across_ranks,
)
from hessian_eigenthings.operators.hessian import HessianOperator, LossFn
from hessian_eigenthings.param_utils import ParamFilterLike

__all__ = ["ShardedHessianOperator"]


def _dtensor_types() -> tuple[Any, Any]:
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def _reshard(model: nn.Module) -> None:
    """Return every FSDP module to its sharded state.

    A forward without backward (``no_grad`` probes, or the user's evaluation) leaves the
    root's parameters all-gathered and registered as plain tensors; the sharded
    ``DTensor`` parameters must be the registered ones before selecting or perturbing.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _local_device(p: torch.Tensor) -> torch.device:
    to_local = getattr(p, "to_local", None)
    return to_local().device if callable(to_local) else p.device


def _group_of(model: nn.Module) -> Any:
    """Process group of the model's (first) sharded parameter; default group otherwise."""
    DTensor, _ = _dtensor_types()
    for p in model.parameters():
        if isinstance(p, DTensor):
            return p.device_mesh.get_group()
    return None


def _gradient_scales(model: nn.Module, params: Sequence[nn.Parameter], world: int) -> list[float]:
    """Per parameter, the factor FSDP divides summed gradients by (default: world size)."""
    factors: dict[int, float] = {}
    for m in model.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        group = getattr(get_state(), "_fsdp_param_group", None)
        if group is None:
            continue
        factor = getattr(group, "gradient_divide_factor", None)
        for fp in getattr(group, "fsdp_params", ()):
            factors[id(fp.sharded_param)] = float(world if factor is None else factor)
    return [factors.get(id(p), float(world)) for p in params]


class _LockStep:
    """One product's rounds: FSDP's passes are collective, so all ranks run as many.

    Before each (micro)batch, one all-reduce of ``[has a piece, W_r (ranks without a
    piece; NaN if the rank's shard of the product is not finite), w_0, ..., w_{R-1},
    ||v_{r,1}||^2, ..., ||v_{r,b}||^2 (first round only)]``, where ``w_r`` is the weight
    of rank ``r``'s piece (its own slot; zero elsewhere) and ``v_{r,j}`` the rank's shard
    of the block's ``j``-th vector, and one host read of the result: the only host
    synchronisation of a round, whatever the block's width. Ranks that ran out of
    pieces repeat their last one with weight 0 (and still add their shard of the pass's
    summed gradient) until every rank is done; the round in which no rank has a piece
    carries the total weight.
    """

    def __init__(
        self, group: Any, rank: int, world: int, rows: torch.Tensor, vs: list[torch.Tensor]
    ) -> None:
        self.group = group
        self.rank = rank
        self.world = world
        self.vs = vs  # the block in parameter blocks: ranks without a piece perturb too
        self.width = rows.shape[0]
        self.sq: torch.Tensor | None = torch.stack([squared_norm([r]) for r in rows])
        self.vnorm = torch.zeros(self.width, dtype=torch.float64, device=rows.device)
        self.losses: list[torch.Tensor] = []  # two per vector and pass (at theta +- h u)
        self.filler: Any = None  # the last piece's data, rerun with weight 0
        self.total_weight = math.nan  # the summed weight of the last round, on the host

    def round(
        self,
        *,
        has_piece: bool,
        weight: int | torch.Tensor = 0,
        total: torch.Tensor | None = None,
    ) -> tuple[int, torch.Tensor, float]:
        """``(ranks with a piece, summed weight, this rank's piece weight)`` of this round.

        One all-reduce and one host read. With a piece, ``weight`` is the piece's (read
        back from this rank's slot); without, it is the rank's total, sent as NaN when
        ``total`` (the rank's shard of the product) is not finite.
        """
        sq_at = 2 + self.world  # [has piece, W, w_0 .. w_{R-1}, ||v_j||^2 ...]
        ctrl = torch.zeros(sq_at + self.width, dtype=torch.float64, device=self.vnorm.device)
        if has_piece:
            ctrl[0] = 1.0
            ctrl[2 + self.rank] = weight
        elif total is not None:
            w = (
                weight.to(ctrl.device, torch.float64)
                if isinstance(weight, torch.Tensor)
                else torch.full((), float(weight), dtype=torch.float64, device=ctrl.device)
            )
            # elementwise test in chunks: no temporaries of the shard's size
            finite = torch.stack([torch.isfinite(c).all() for c in total.split(1 << 20)]).all()
            ctrl[1] = torch.where(finite, w, w.new_full((), float("nan")))
        else:
            ctrl[1] = weight
        if self.sq is not None:
            ctrl[sq_at:] = self.sq
        host = sum_across_ranks(ctrl, self.group).tolist()  # the round's one host read
        self.total_weight = host[1]
        if self.sq is not None:
            self.vnorm = torch.tensor(
                [math.sqrt(q) for q in host[sq_at:]], dtype=torch.float64, device=self.vnorm.device
            )
            self.sq = None
        return int(host[0]), torch.tensor(host[1], dtype=torch.float64), host[2 + self.rank]


class ShardedHessianOperator(HessianOperator):
    r"""Finite-difference Hessian of the mean loss of an FSDP2-sharded model.

    Vectors passed to :meth:`matvec` are *local shards* of shape
    ``(backend.local_size(size),)``; :attr:`size` is the global dimension. Use
    ``operator.backend.shard(full)`` / ``operator.backend.gather(local)`` to convert.

    Shards may differ in size and in their number of batches and microbatches. FSDP's
    forward and backward are collective, so every rank must run the same number of
    passes: before each microbatch one small all-reduce tells whether any rank still
    has data, and a rank that has run out repeats its last microbatch with weight 0
    (an exact zero contribution). Batches are weighted by their number of samples (or
    ``weight_fn``) across all ranks. Gradients of every parameter are computed (FSDP
    reduce-scatters them per module); only the selected ones are read. An exception
    raised on one rank in the middle of a matvec (e.g. by ``loss_fn``) leaves the
    other ranks waiting in FSDP's collectives, as in training.

    Args:
        model: A module prepared with ``torch.distributed.fsdp.fully_shard``; the
            selected parameters must be ``DTensor`` s with placement ``Shard(0)`` on a
            1-D mesh. Never modified.
        dataloader: This rank's batches (re-iterable, or a factory returning one).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of the batch.
        param_filter: Which parameters span the operator (default: all trainable).
        full_dataset: All batches per matvec (``True``) or the next batch (``False``).
        num_batches: Use only the first ``num_batches`` batches.
        microbatch_size: Split batches into pieces of at most this many samples.
        fd_eps: Step for the unit direction; default ``eps ** (1/3)`` of the dtype the
            model computes in: with ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``
            (float32 shards, bfloat16 forward and backward) the bfloat16 step, observed
            in one (collective) forward at construction.
        fd_compute_dtype: The dtype the model computes in, if known (skips that forward).
        weight_fn: ``batch -> weight``; default ``loss_fn.batch_weight`` or batch size.
        check_determinism: Raise at construction if the loss is random (dropout).

    Example (under ``torchrun``)::

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        H = ShardedHessianOperator(model, my_shard_loader, loss_fn)
        res = lanczos(H, k=5, seed=0)         # same eigenvalues on every rank
        top = H.backend.gather(res.eigenvectors[0])  # whole eigenvector (all-gather)

    Raises:
        RuntimeError: No initialised process group.
        ValueError: Parameters are not FSDP2 shards, ranks disagree on the operator
            (size, dtype, parameters), a rank has no data, or the loss is random.
            Raised on every rank (a rank that failed re-raises its own error, the
            others a RuntimeError naming it).
        NonFiniteError: (from a product) The product is not finite; raised on every
            rank, naming the batch whose loss went non-finite and the rank holding it
            (FSDP sums every rank's gradients, so all shards go non-finite together).
    """

    # forwards are collective: the determinism check runs after every rank is built
    _probe_in_init = False

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        loss_fn: LossFn,
        *,
        param_filter: ParamFilterLike = None,
        full_dataset: bool = True,
        num_batches: int | None = None,
        microbatch_size: int | None = None,
        fd_eps: float | None = None,
        weight_fn: WeightFn | None = None,
        check_determinism: bool = True,
        fd_compute_dtype: torch.dtype | None = None,
    ) -> None:
        require_process_group(type(self).__name__)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        _reshard(model)
        self.process_group = _group_of(model)
        self._world = dist.get_world_size(self.process_group)
        error: BaseException | None = None
        try:
            super().__init__(
                model,
                dataloader,
                loss_fn,
                method="finite_difference",
                fd_eps=fd_eps,
                fd_compute_dtype=fd_compute_dtype,
                param_filter=param_filter,
                full_dataset=full_dataset,
                num_batches=num_batches,
                microbatch_size=microbatch_size,
                weight_fn=weight_fn,
                check_determinism=False,  # collective forwards: after the agreement
            )
            self._backend = ShardedBackend(self._rank_ranges(), self.size, self.process_group)
            self._grad_scale = _gradient_scales(model, self.params, self._world)
        except Exception as err:
            error = err
        first = next(model.parameters(), None)
        device = _local_device(first) if first is not None else torch.device("cpu")
        agree_on_build(self, error, self.process_group, device)
        # their forwards are collective: after the agreement
        self._on_every_rank(self._settle_fd_step, Exception, "choose the finite-difference step")
        if check_determinism:
            self._on_every_rank(
                self._check_determinism,
                ValueError,
                "pass the determinism check (the loss is random there)",
            )

    _collective_passes = True  # the step is settled after every rank built its operator

    # -- construction ----------------------------------------------------------------------
    def _on_every_rank(self, step: Callable[[], object], catch: type[Exception], what: str) -> None:
        """Run a collective step of construction; an error of one rank is raised on every rank.

        Args:
            step: The step (its forwards are collective).
            catch: The errors of ``step`` that are raised on every rank (others propagate).
            what: The step in the other ranks' message (``"rank(s) ... failed to <what>"``).
        """
        error: BaseException | None = None
        try:
            step()
        except catch as err:
            error = err
        finally:
            _reshard(self.model)
        raise_on_every_rank(type(self).__name__, error, self.process_group, self._device, what=what)

    def _vector_blocks(self) -> list[torch.Tensor]:
        """This rank's shards of the selected parameters (a vector is split like them)."""
        DTensor, Shard = _dtensor_types()
        mesh = None
        for name, param in self.named_params:
            p: Any = param
            if not isinstance(p, DTensor):
                raise ValueError(
                    f"Parameter {name} is not sharded (a {type(p).__name__}, not a DTensor). "
                    "Apply torch.distributed.fsdp.fully_shard to the modules holding the "
                    "selected parameters (at least the root), or use DDPHessianOperator for "
                    "replicated parameters."
                )
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(
                    f"Parameter {name} has placements {tuple(p.placements)} on a "
                    f"{p.device_mesh.ndim}-D mesh; ShardedHessianOperator supports FSDP2's "
                    "default Shard(0) on a 1-D mesh (no HSDP, no custom shard_placement_fn)."
                )
            if mesh is None:
                mesh = p.device_mesh
            elif p.device_mesh != mesh:
                raise ValueError(f"Parameter {name} lives on a different device mesh.")
        return [p.to_local() for p in self.params]  # type: ignore[attr-defined]

    def _rank_ranges(self) -> list[list[tuple[int, int]]]:
        """Global index ranges held by every rank (``torch.chunk`` rows of dim 0)."""
        me = dist.get_rank(self.process_group)
        ranges: list[list[tuple[int, int]]] = [[] for _ in range(self._world)]
        for (name, p), local, off in zip(self.named_params, self._blocks, self.layout.offsets):
            rows = p.shape[0] if p.dim() > 0 else 1
            row = p.numel() // max(rows, 1)
            chunk = -(-rows // self._world)
            for r in range(self._world):
                lo, hi = min(r * chunk, rows), min((r + 1) * chunk, rows)
                if r == me and (hi - lo) * row != local.numel():
                    raise ValueError(
                        f"Parameter {name}: local shard has {local.numel()} entries, expected "
                        f"{(hi - lo) * row} for torch.chunk sharding of dim 0 over "
                        f"{self._world} ranks."
                    )
                if hi > lo:
                    ranges[r].append((off + lo * row, off + hi * row))
        return ranges

    # -- CurvatureOperator -----------------------------------------------------------------
    @property
    def backend(self) -> ShardedBackend:
        return self._backend  # type: ignore[return-value]

    @property
    def local_size(self) -> int:
        """Entries of every vector held by this rank."""
        return self.backend.local_size(self.size)

    # -- the data loop's seams ---------------------------------------------------------------
    def _guard(self) -> AbstractContextManager[None]:
        # every parameter keeps requires_grad: FSDP reduce-scatters gradients per module.
        # No snapshot of the shards: the finite-difference passes write them back
        # themselves, bit for bit, also when a pass raises (perturbed_pair).
        return preserve_model_state(self.model)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        _reshard(self.model)
        rank = dist.get_rank(self.process_group)
        rows = V.T  # one vector per row
        self._rounds = _LockStep(self.process_group, rank, self._world, rows, self._split(rows))
        return super()._matmat(V)

    def _pieces(self) -> Iterator[Piece]:
        rounds = self._rounds
        for piece in super()._pieces():
            _, _, mine = rounds.round(has_piece=True, weight=piece.weight)
            if isinstance(piece.weight, torch.Tensor) and not mine > 0:
                # The loss of an all-ignored piece may be NaN, and FSDP's reduce-scatter
                # would spread it to every rank: the pass reruns the last piece (finite
                # loss) with weight 0 instead. Its count was read with the round.
                data = piece.data if rounds.filler is None else rounds.filler
                yield Piece(data, piece.batch_index, piece.microbatch_index, 0)
                continue
            rounds.filler = piece.data
            yield piece

    def _weighted_product(
        self, piece: Piece, vs: Sequence[torch.Tensor], like: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        # The weight is applied inside the loss (_grad_at): the reduce-scatter adds every
        # rank's weighted gradient, so the product owes no unit.
        return self._flat_product(piece, vs, like), 1

    def _grad_at(self, piece: Piece) -> list[torch.Tensor | None]:
        """This rank's shard of ``sum_r w_r grad L_r`` over the ranks' pieces of the pass.

        The local tensors of the fresh ``.grad`` s, rescaled in place (no copies).
        """
        for p in self.model.parameters():
            p.grad = None
        loss = self._loss(piece.data)
        self._rounds.losses.append(loss.detach())
        w = piece.weight
        (loss * (w.to(loss.dtype) if isinstance(w, torch.Tensor) else w)).backward()
        grads: list[torch.Tensor | None] = []
        for p, scale in zip(self.params, self._grad_scale):
            g = None if p.grad is None else p.grad.to_local()  # type: ignore[attr-defined]
            grads.append(g if g is None or scale == 1 else g.mul_(scale))
        return grads

    def _flat_product(
        self, piece: Piece, vs: Sequence[torch.Tensor], like: torch.Tensor
    ) -> torch.Tensor:
        """This rank's shard of the pass's difference quotients, rows ``(b, n)`` in one buffer.

        Per vector, parameter and in the storage dtype: the gradient at ``theta + h u_j``
        is copied into the parameter's slice of the vector's row and freed, the one at
        ``theta - h u_j`` subtracted in place, and the row scaled by ``||v_j|| / (2h)``
        (the global norm, agreed in the first round). Besides the buffer, the extra memory
        is the saved shards (to restore them exactly) and one set of gradient shards; no
        float64 copies, no concatenation. Finite differences share no pass between
        vectors: two collective forward/backward passes per vector.
        """
        out = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        sizes = [b.numel() for b in self._blocks]
        h = (self._fd_step or self._settle_fd_step()).at_product(self.device)
        for j, row in enumerate(out):
            views = [o.view(b.shape) for o, b in zip(row.split(sizes), self._blocks)]
            signs = iter((1, -1))

            def pass_into_buffer(views: list[torch.Tensor] = views, signs: Any = signs) -> None:
                sign = next(signs)
                for view, g in zip(views, self._grad_at(piece)):
                    if g is not None:
                        view.add_(g.to(view.dtype), alpha=sign)
                for p in self.model.parameters():
                    p.grad = None  # free this pass's gradients before the next pass

            vnorm = self._rounds.vnorm[j]
            perturbed_pair(self._blocks, [v[j] for v in vs], h, pass_into_buffer, vnorm=vnorm)
            row.mul_((vnorm / (2 * h)).to(out.dtype))
        return out

    def _reduce(
        self, total: torch.Tensor, weight: int | torch.Tensor
    ) -> tuple[torch.Tensor, int | torch.Tensor]:
        # FSDP sums every rank's weighted gradients into each rank's shard, so a rank
        # that ran out of pieces keeps running passes (its last piece, weight 0) and
        # adding its shard of them until no rank has pieces; the last round agrees on
        # the weight and on finiteness.
        rounds = self._rounds
        while True:
            busy, total_weight, _ = rounds.round(has_piece=False, weight=weight, total=total)
            if busy == 0:
                return total, total_weight
            if rounds.filler is None:  # this rank had no piece at all
                rounds.filler = self.source.microbatches(self.source.first_batch())[0]
            total.add_(self._flat_product(Piece(rounds.filler, -1, 0, 0), rounds.vs, total))

    def _all_finite(self, total: torch.Tensor, weight: int | torch.Tensor) -> tuple[bool, bool]:
        # ``weight`` is the host copy of the last round (NaN if a rank's shard was not
        # finite), already read: no device is touched here
        w = self._rounds.total_weight
        return math.isfinite(w), w > 0

    def _raise_non_finite(
        self, total: torch.Tensor, flags: list[tuple[int, int, torch.Tensor]]
    ) -> None:
        mine_bad = self._non_finite_names(total)  # of this rank's shards: agree on all
        bad_blocks = any_across_ranks(
            torch.tensor([n in mine_bad for n, _ in self.named_params]), self.process_group
        )
        names = tuple(n for (n, _), bad in zip(self.named_params, bad_blocks) if bad)
        losses, per_pass = self._rounds.losses, 2 * self._rounds.width
        mine = [
            (
                b,
                m,
                bool(torch.isfinite(torch.stack(losses[per_pass * i : per_pass * (i + 1)])).all()),
                bool(torch.isfinite(f)),
            )
            for i, (b, m, f) in enumerate(flags)
        ]
        ranks = list(enumerate(gather_objects(mine, self.process_group)))
        # A non-finite loss names its batch; a finite loss with a non-finite gradient
        # cannot be told apart from the other ranks' pieces of its pass.
        bad = [(b, m, f" on rank {r}") for r, rows in ranks for b, m, ok, _ in rows if not ok]
        bad = bad or [
            (b, m, f" on rank {r}") for r, rows in ranks for b, m, _, ok in rows if not ok
        ]
        raise self._non_finite_error(bad, names)

    def __repr__(self) -> str:
        return (
            f"ShardedHessianOperator(size={self.size}, local_size={self.local_size}, "
            f"dtype={self.dtype}, world_size={self._world})"
        )

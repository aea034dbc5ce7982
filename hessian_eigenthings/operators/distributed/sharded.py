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

Communication per matvec: before each microbatch round one all-reduce of three
float64 numbers (ranks with data left; ``||v||^2`` in the first round; the total
weight in the last), i.e. ``P + 1`` small all-reduces for at most ``P`` microbatches
on any rank, plus FSDP's all-gathers and reduce-scatters for two forward/backward
passes per round. Each round reads the small buffer on the host (one synchronisation
per microbatch, negligible next to two collective forward/backward passes).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hessian_eigenthings.backends.distributed import ShardedBackend, collective_device
from hessian_eigenthings.operators._autodiff_safety import curvature_mode
from hessian_eigenthings.operators._data import BatchSource, WeightFn, leading_dim
from hessian_eigenthings.operators._guard import preserve_model_state
from hessian_eigenthings.operators.base import CurvatureOperator, _precision_rank
from hessian_eigenthings.operators.hessian import default_fd_eps
from hessian_eigenthings.param_utils import ParamFilterLike, ParamLayout, select_params

__all__ = ["ShardedHessianOperator"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


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


class ShardedHessianOperator(CurvatureOperator):
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
        fd_eps: Step for the unit direction; default ``eps ** (1/3)`` of the dtype.
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
    """

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
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ShardedHessianOperator needs an initialised torch.distributed process group "
                "and a model prepared with torch.distributed.fsdp.fully_shard."
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}.")
        if fd_eps is not None and not fd_eps > 0:
            raise ValueError(f"fd_eps must be positive, got {fd_eps!r}.")
        self.model = model
        self.loss_fn = loss_fn
        _reshard(model)
        self.process_group = _group_of(model)
        error: BaseException | None = None
        try:
            self._build(
                dataloader,
                param_filter,
                full_dataset,
                num_batches,
                microbatch_size,
                fd_eps,
                weight_fn,
            )
        except Exception as err:
            error = err
        self._agree(error)
        if check_determinism:
            self._check_determinism()

    # -- construction ----------------------------------------------------------------------
    def _check_sharding(self) -> Any:
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
        return mesh

    def _rank_ranges(self) -> list[list[tuple[int, int]]]:
        """Global index ranges held by every rank (``torch.chunk`` rows of dim 0)."""
        me = dist.get_rank(self.process_group)
        ranges: list[list[tuple[int, int]]] = [[] for _ in range(self._world)]
        for (name, p), local, off in zip(self.named_params, self._local, self.layout.offsets):
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

    def _build(
        self,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        param_filter: ParamFilterLike,
        full_dataset: bool,
        num_batches: int | None,
        microbatch_size: int | None,
        fd_eps: float | None,
        weight_fn: WeightFn | None,
    ) -> None:
        """Everything local (no collective) that construction needs."""
        self.named_params = select_params(self.model, param_filter)
        self.params = [p for _, p in self.named_params]
        self.layout = ParamLayout.of(self.named_params)
        mesh = self._check_sharding()
        self.process_group = mesh.get_group()
        self._world = mesh.size()
        dtype = self.params[0].dtype
        for p in self.params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        self._dtype = dtype
        self._local = [p.to_local() for p in self.params]  # type: ignore[attr-defined]
        self._device = self._local[0].device
        self._backend = ShardedBackend(self._rank_ranges(), self.layout.size, self.process_group)
        self.fd_eps = fd_eps if fd_eps is not None else default_fd_eps(dtype)
        self._grad_scale = _gradient_scales(self.model, self.params, self._world)
        self.source = BatchSource(
            dataloader,
            full_dataset=full_dataset,
            num_batches=num_batches,
            microbatch_size=microbatch_size,
            device=self._device,
        )
        self._weight_fn: WeightFn = (
            weight_fn or getattr(self.loss_fn, "batch_weight", None) or leading_dim
        )

    def _agree(self, error: BaseException | None) -> None:
        """One small all-gather: every rank built its operator, and they all match."""
        first = next(self.model.parameters(), None)
        device = _local_device(first) if first is not None else torch.device("cpu")
        if error is None:
            layout = ";".join(
                f"{n}:{tuple(s)}" for n, s in zip(self.layout.names, self.layout.shapes)
            )
            mine = [1, self.size, zlib.crc32(str(self.dtype).encode()), zlib.crc32(layout.encode())]
        else:
            mine = [0, -1, 0, 0]
        dev = collective_device(self.process_group, device)
        local = torch.tensor(mine, dtype=torch.int64, device=dev)
        world = dist.get_world_size(self.process_group)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=self.process_group)
        rows = [[int(x) for x in t.tolist()] for t in gathered]
        if error is not None:
            raise error
        failed = [r for r, row in enumerate(rows) if row[0] == 0]
        if failed:
            raise RuntimeError(
                f"ShardedHessianOperator: rank(s) {failed} of the process group failed to build "
                "their operator (see their error); no rank can compute a matvec."
            )
        for field, idx in (("size", 1), ("dtype", 2), ("parameter names and shapes", 3)):
            if len({row[idx] for row in rows}) > 1:
                raise ValueError(
                    f"ShardedHessianOperator: ranks disagree on the operator's {field}; every "
                    "rank must shard the same model with the same param_filter."
                )

    def _check_determinism(self) -> None:
        """Evaluate the loss twice on each rank's first microbatch (collective forwards)."""
        batch = self.source.first_batch()
        piece = self.source.microbatches(batch)[0]
        with preserve_model_state(self.model), curvature_mode(self._device, self._dtype):
            cuda = [self._device] if self._device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                a = self.loss_fn(self.model, piece).detach()
                b = self.loss_fn(self.model, piece).detach()
        _reshard(self.model)
        dev = collective_device(self.process_group, self._device)
        same = torch.tensor([int(torch.equal(a, b))], dtype=torch.int64, device=dev)
        dist.all_reduce(same, op=dist.ReduceOp.MIN, group=self.process_group)
        if int(same.item()) == 0:
            raise ValueError(
                "ShardedHessianOperator: the loss differs between two evaluations on the same "
                "batch (on some rank), so the curvature would be random. Call model.eval() (or "
                "set dropout to 0), or pass check_determinism=False."
            )

    # -- CurvatureOperator -----------------------------------------------------------------
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
    def backend(self) -> ShardedBackend:
        return self._backend

    @property
    def local_size(self) -> int:
        """Entries of every vector held by this rank."""
        return self._backend.local_size(self.size)

    def _check_vector(self, v: Any, *, ndim: int) -> None:
        n_local = self.local_size
        what = "vector" if ndim == 1 else "block"
        expected = f"({n_local},)" if ndim == 1 else f"({n_local}, b)"
        if not isinstance(v, torch.Tensor) or v.dim() != ndim or v.shape[0] != n_local:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"ShardedHessianOperator expected this rank's shard of a {what}, shape "
                f"{expected} (global size {self.size}), got {got}. Convert a global vector "
                "with operator.backend.shard(v)."
            )
        if not v.is_floating_point() or (
            v.dtype != self.dtype and _precision_rank(v.dtype) < _precision_rank(self.dtype)
        ):
            raise TypeError(
                f"ShardedHessianOperator computes in {self.dtype}; got a {what} of dtype "
                f"{v.dtype}. Pass v.to({self.dtype}) (or a higher floating precision)."
            )
        if v.device != self.device:
            raise ValueError(
                f"ShardedHessianOperator expected a {what} on device {self.device}, got "
                f"{v.device}. Move it with v.to({str(self.device)!r})."
            )

    def to_scipy(self) -> Any:
        raise TypeError(
            "A sharded operator has no whole-vector matvec for SciPy; gather the vectors with "
            "operator.backend.gather or use the library's algorithms, which run on shards."
        )

    def _passes(self) -> Iterator[tuple[Any, float]]:
        """This rank's ``(microbatch, weight)`` pairs for one matvec."""
        for batch in self.source.batches():
            pieces = self.source.microbatches(batch)
            for name, m in self.model.named_modules():
                if (
                    len(pieces) > 1
                    and isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and m.training
                ):
                    raise ValueError(
                        f"microbatch_size splits batches but {name} is a train-mode "
                        f"{type(m).__name__}; call model.eval() or drop microbatch_size."
                    )
            for mb in pieces:
                yield mb, float(self._weight_fn(mb))

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        sizes = [t.numel() for t in self._local]
        vs = [
            piece.view(t.shape).to(t.dtype) for piece, t in zip(torch.split(v, sizes), self._local)
        ]
        dev = collective_device(self.process_group, v.device)
        diff = torch.zeros(v.numel(), dtype=torch.float64, device=v.device)
        _reshard(self.model)
        all_params = list(self.model.parameters())
        with (
            preserve_model_state(self.model, snapshot_params=self.params),
            curvature_mode(self._device, self._dtype),
        ):
            base = [t.detach().clone() for t in self._local]
            passes = self._passes()
            filler: Any = None  # a microbatch to repeat with weight 0 once this rank is done
            local_weight = 0.0
            step = 0.0
            vnorm: float | None = None
            while True:
                # [ranks with data left, ||v||^2 (first round), weight (when done)], summed.
                item = next(passes, None)
                ctrl = torch.zeros(3, dtype=torch.float64, device=dev)
                if item is not None:
                    ctrl[0] = 1.0
                else:
                    ctrl[2] = local_weight
                if vnorm is None:
                    ctrl[1] = torch.dot(v.double(), v.double()).to(dev)
                dist.all_reduce(ctrl, group=self.process_group)
                flags = ctrl.cpu()
                if vnorm is None:
                    vnorm = float(flags[1]) ** 0.5
                    step = self.fd_eps / vnorm if vnorm > 0 else 0.0
                if flags[0] == 0:
                    total_weight = float(flags[2])
                    break
                if item is None:
                    mb, w = filler, 0.0
                else:
                    mb, w = item
                    if filler is None or w > 0:
                        filler = mb
                    if w == 0:  # empty or fully ignored piece: run a finite one with weight 0
                        mb = filler
                    local_weight += w
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        for t, b, d in zip(self._local, base, vs):
                            t.copy_(b + (sign * step) * d)
                    for p in all_params:
                        p.grad = None
                    (self._loss(mb) * w).backward()
                    diff += sign * self._flat_grads()
            for p in all_params:
                p.grad = None
        if total_weight <= 0 or not vnorm:
            return torch.zeros_like(v)
        return (diff * (vnorm / (2 * self.fd_eps) / total_weight)).to(v.dtype)

    def _loss(self, batch: Any) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar tensor (the mean loss of the batch), got {got}."
            )
        return loss

    def _flat_grads(self) -> torch.Tensor:
        parts = []
        for p, t, scale in zip(self.params, self._local, self._grad_scale):
            g = p.grad
            if g is None:
                parts.append(torch.zeros(t.numel(), dtype=torch.float64, device=t.device))
            else:
                parts.append(g.to_local().reshape(-1).double() * scale)  # type: ignore[attr-defined]
        return torch.cat(parts)

    def __repr__(self) -> str:
        return (
            f"ShardedHessianOperator(size={self.size}, local_size={self.local_size}, "
            f"dtype={self.dtype}, world_size={self._world})"
        )

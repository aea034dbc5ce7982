"""The exact Hessian of the mean loss, by double backward or finite differences."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hessian_eigenthings._compat import legacy_keywords, microbatch_unsafe_flag
from hessian_eigenthings.operators._autodiff_safety import curvature_mode
from hessian_eigenthings.operators._compute_dtype import FDStep, observed_compute_dtype
from hessian_eigenthings.operators._data import Piece
from hessian_eigenthings.operators._finite_difference import default_fd_eps, perturbed_pair
from hessian_eigenthings.operators._guard import preserve_model_state
from hessian_eigenthings.operators._lm_head import chunked_head
from hessian_eigenthings.operators._user_fns import check_callable, check_graph, check_scalar_loss
from hessian_eigenthings.operators.data_operator import DataCurvatureOperator, DataOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["HessianOperator", "default_fd_eps"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class HessianOperator(DataCurvatureOperator):
    r"""Hessian of the mean loss over a dataset with respect to selected parameters.

    .. math::

        H = \nabla^2_\theta \, \frac{1}{W} \sum_b w_b \, L_b(\theta),

    where ``L_b = loss_fn(model, batch_b)`` is the mean loss of batch ``b`` and ``w_b``
    its number of samples (or tokens), so ragged batches are weighted exactly.

    The product is computed in one of two ways (``method``):

    - ``"autograd"`` (default): exact Hessian-vector product by double backward,
      ``H v = \nabla_\theta \langle \nabla_\theta L, v \rangle``. Runs inside
      :func:`~hessian_eigenthings.operators._autodiff_safety.curvature_mode`, so
      attention and normalisation layers are differentiated exactly (this path only:
      finite differences keep the model's own attention kernels).
    - ``"finite_difference"``: central difference of exact gradients along the unit
      direction ``u = v / ||v||``,
      ``H v ~ ||v|| (g(\theta + h u) - g(\theta - h u)) / (2h)``. Linear in ``v`` and
      exact up to ``O(h^2)``; needs only first-order autograd (works with any layer and
      with sharded parameters). Parameters are restored bit for bit afterwards. The
      step is taken from the dtype the model *computes* in (see
      :mod:`~hessian_eigenthings.operators._compute_dtype`): parameters stored in
      float32 but run in bfloat16 (``torch.autocast``, FSDP2 mixed precision) get the
      bfloat16 step, detected by one forward at construction or given as
      ``fd_compute_dtype``.

    Blocks (:meth:`matmat`, and every algorithm's probe blocks): with ``"autograd"``,
    each (micro)batch costs one forward and one first backward (``create_graph=True``)
    for the whole block, then one reverse pass through that graph per vector,
    ``H v_j = \nabla_\theta \langle \nabla_\theta L, v_j \rangle``: in a loop over the
    retained graph (``block_mode="loop"``) or batched (``"vmap"``,
    ``is_grads_batched=True``). ``matvec`` is the block of one. With
    ``"finite_difference"`` every vector needs its own two gradients; a block shares only
    the pass over the data.

    ``keep_graphs=True`` (``"autograd"`` only) keeps, for every (micro)batch, the forward
    graph and the first backward's graph alive between products, so each later product
    is one reverse pass per vector and (micro)batch. Memory: about the peak of one
    Hessian-vector product (the activations plus the first backward's saved tensors,
    roughly 2-3x a training step's activations) per (micro)batch, for all of them at
    once; only for data that fits. A product raises if a parameter changed (in place or
    replaced), a module switched train/eval mode or a kept batch was modified;
    :meth:`release_graphs` frees them.

    Args:
        model: The model; never modified.
        dataloader: Re-iterable of batches (or a factory returning one).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of the batch.
        method: ``"autograd"`` or ``"finite_difference"``.
        fd_eps: Finite-difference step for the unit direction; default
            :func:`default_fd_eps` of the dtype the model computes in. A step below twice
            that dtype's unit roundoff (pure rounding noise) raises ``ValueError``.
        fd_compute_dtype: The dtype the model computes in (e.g. ``torch.bfloat16`` under
            autocast with float32 parameters); default: observed in one forward of the
            loss on the first microbatch at construction (finite differences only), and
            lowered at each product to the dtype of an enclosing ``torch.autocast``.
        lm_head: ``"auto"`` (default): when ``loss_fn`` is a language-model loss of the
            library (:func:`~hessian_eigenthings.loss_fns.huggingface.hf_lm_loss`,
            :func:`~hessian_eigenthings.loss_fns.transformer_lens.tlens_loss`) and the
            model's logits come straight from its linear output embedding, the
            ``(tokens, V)`` logits are never formed: the model runs up to the head's input
            and head and loss are applied in chunks of tokens (exact; see
            :mod:`~hessian_eigenthings.operators._lm_head`). ``"chunked"``: the same,
            raising where it does not apply; ``"off"``: never.
        lm_head_chunk: Tokens per chunk (default ``2^22 / V``: 16 MiB of float32 logits).
        **options: The data-loop options of
            :class:`~hessian_eigenthings.operators.data_operator.DataCurvatureOperator`
            (``param_filter``, ``full_dataset``, ``num_batches``, ``microbatch_size``,
            ``weight_fn``, ``check_determinism``, ``backend``, ``block_mode``,
            ``max_block``, ``keep_graphs``); ``weight_fn`` defaults to
            ``loss_fn.batch_weight`` or the batch size.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1))]
        >>> loss = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])
        >>> H = HessianOperator(model, data, loss)
        >>> H.size
        4
    """

    _probe_is_mean_loss = True

    @legacy_keywords(translate=microbatch_unsafe_flag)
    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        loss_fn: LossFn,
        *,
        method: str = "autograd",
        fd_eps: float | None = None,
        fd_compute_dtype: torch.dtype | None = None,
        lm_head: str = "auto",
        lm_head_chunk: int | None = None,
        **options: Unpack[DataOptions],
    ) -> None:
        if method not in ("autograd", "finite_difference"):
            raise ValueError(
                f"Unknown method {method!r} for HessianOperator; expected 'autograd' or "
                "'finite_difference'."
            )
        check_callable(loss_fn, "loss_fn", "(model, batch) -> loss")
        if fd_eps is not None and not fd_eps > 0:
            raise ValueError(f"fd_eps must be positive, got {fd_eps!r}.")
        if fd_compute_dtype is not None and (
            not isinstance(fd_compute_dtype, torch.dtype) or not fd_compute_dtype.is_floating_point
        ):
            raise TypeError(
                "fd_compute_dtype must be a floating torch.dtype or None, got "
                f"{fd_compute_dtype!r}."
            )
        self.loss_fn = loss_fn
        self.method = method
        # the determinism probe runs once the LM head is set up (it may chunk the probe too)
        check = options.get("check_determinism", True)
        options["check_determinism"] = False
        self._fd_args = (fd_eps, fd_compute_dtype)
        # the compute dtype seen by the construction probe's forward (not run twice)
        self._observed: tuple[torch.dtype | None] | None = None
        super().__init__(model, dataloader, loss_for_weights=loss_fn, **options)
        self.fd_eps = fd_eps if fd_eps is not None else default_fd_eps(self.dtype)
        self._fd_step: FDStep | None = None
        if method == "finite_difference" and not self._collective_passes:
            self._settle_fd_step()
        self._head = chunked_head(
            mode=lm_head,
            owner=type(self).__name__,
            model=self.model,
            named_params=self.named_params,
            loss=loss_fn,
            forward_fn=None,
            first_batch=self.source.first_batch,
            chunk=lm_head_chunk,
            device=self.device,
            dtype=self.dtype,
            unsupported=(
                "finite differences differentiate the whole loss (method='autograd' chunks)"
                if method != "autograd"
                else "keep_graphs keeps each batch's whole graph (logits included)"
                if self._graphs is not None
                else None
            ),
        )
        if check:
            self._check_determinism()

    def _loss(self, batch: Any) -> torch.Tensor:
        return check_scalar_loss(self.loss_fn(self.model, batch), "loss_fn")

    def _probe_loss(self, batch: Any) -> torch.Tensor:
        if self._head is not None:
            return self._head.probe(batch)
        return self._loss(batch).detach()

    def _graph_probe(self, batch: Any) -> None:
        if self.method != "finite_difference" or self._fd_args[1] is not None:
            check_graph(self._loss(batch), "loss_fn", "a loss")
            return
        losses: list[torch.Tensor] = []
        self._observed = (observed_compute_dtype(lambda: losses.append(self._loss(batch))),)
        check_graph(losses[0], "loss_fn", "a loss")

    def _snapshot_params(self) -> Sequence[nn.Parameter]:
        return self.params if self.method == "finite_difference" else ()

    def _keep_graphs_unsupported(self) -> str | None:
        if self.method == "finite_difference":
            return "finite differences evaluate gradients at new points for every vector"
        return None

    def _piece_product(
        self, piece: Piece, vs: Sequence[torch.Tensor]
    ) -> Sequence[torch.Tensor | None]:
        hv = self._piece_products(piece, [v.unsqueeze(0) for v in vs])
        return [None if h is None else h[0] for h in hv]

    def _piece_products(
        self, piece: Piece, vs: Sequence[torch.Tensor]
    ) -> Sequence[torch.Tensor | None]:
        if self.method == "finite_difference":
            return self._fd_products(piece, vs)
        if self._head is not None:  # the LM head chunked over tokens; the block shares the trunk
            return self._stack_columns(self._head.hessian(piece, vs), vs)
        # double backward: the forward must run kernels that are twice differentiable
        with curvature_mode(self.device, self.dtype):
            graph = self._kept(piece, lambda: self._gradient_graph(piece))
            if graph is None:  # the loss is at most linear in the selected parameters
                return [None] * len(self.params)
            grads, which = graph
            keep = self._graphs is not None
            count = vs[0].shape[0]
            chunks = self._chunks(count)
            parts: list[tuple[torch.Tensor | None, ...]] = []
            for c, cols in enumerate(chunks):
                retain = keep or c < len(chunks) - 1
                cot = [vs[i][cols] for i in which]
                if self.block_mode == "vmap" and count > 1:
                    parts.append(
                        torch.autograd.grad(
                            grads,
                            self.params,
                            cot,
                            retain_graph=retain,
                            allow_unused=True,
                            is_grads_batched=True,
                        )
                    )
                    continue
                width = cot[0].shape[0]
                for j in range(width):
                    col = torch.autograd.grad(
                        grads,
                        self.params,
                        [v[j] for v in cot],
                        retain_graph=retain or j < width - 1,
                        allow_unused=True,
                    )
                    parts.append(tuple(None if h is None else h.unsqueeze(0) for h in col))
        return [
            None if parts[0][i] is None else torch.cat([p[i] for p in parts]).detach()  # type: ignore[misc]
            for i in range(len(self.params))
        ]

    def _gradient_graph(self, piece: Piece) -> tuple[list[torch.Tensor], list[int]] | None:
        r"""The shared part of a block: ``\nabla L_b`` with its graph (``create_graph``).

        Returns the gradients that depend on the parameters and their indices, so that
        ``H V`` is one reverse pass through them per vector (``grad_outputs = v``, since
        ``H`` is symmetric), or ``None`` when no gradient does.
        """
        loss = self._loss(piece.data)
        if not loss.requires_grad:  # no selected parameter reaches the loss
            return None
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        which = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not which:
            return None
        return [grads[i] for i in which], which

    # -- finite differences (also the parameter-sharded operator's product) -------------
    def _grad_at(self, piece: Piece) -> list[torch.Tensor | None]:
        """The gradient of the piece's loss, in blocks shaped like the vector."""
        loss = self._loss(piece.data)
        if not loss.requires_grad:
            return [None] * len(self.params)
        return list(torch.autograd.grad(loss, self.params, allow_unused=True))

    # A subclass whose forward passes are collective (FSDP2) settles the step itself,
    # once every rank has built its operator.
    _collective_passes = False

    def _settle_fd_step(self) -> FDStep:
        """Fix the step from the compute dtype (given, or observed in one forward)."""
        fd_eps, compute = self._fd_args
        if compute is None and self._observed is not None:
            compute = self._observed[0]
        elif compute is None:
            piece = self.source.microbatches(self.source.first_batch())[0]
            with preserve_model_state(self.model), torch.no_grad():
                compute = observed_compute_dtype(lambda: self._loss(piece))
        self._fd_step = FDStep(
            self.dtype, fd_eps=fd_eps, compute=compute, owner=type(self).__name__
        )
        self.fd_eps = self._fd_step.eps
        return self._fd_step

    def _fd_products(self, piece: Piece, vs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Central differences, vector by vector: two gradients at ``theta +- h u_j`` each.

        Nothing of one vector's passes serves another (each runs at its own parameters);
        a block shares only the pass over the data.
        """
        cols = [self._fd_product(piece, [v[j] for v in vs]) for j in range(vs[0].shape[0])]
        return self._stack_columns(cols, vs)

    def _fd_product(self, piece: Piece, vs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        h = (self._fd_step or self._settle_fd_step()).at_product(self.device)
        g_plus, g_minus, vnorm = perturbed_pair(
            self._blocks,
            vs,
            h,
            lambda: self._grad_at(piece),
        )
        factor = vnorm / (2 * h)
        # In place, in the gradients' dtype: the difference of two nearby floats is exact
        # or rounded once, far below the O(eps / h) rounding of the difference quotient.
        return [
            None if gp is None or gm is None else gp.sub_(gm).mul_(factor.to(gp.dtype))
            for gp, gm in zip(g_plus, g_minus)
        ]

r"""Curvature through the model's output: ``J^T M_b J``, the base of the GGN and Fishers.

For an output ``f_b = f(\theta, x_b)`` of batch ``b`` (logits, or the per-sample losses)
with Jacobian ``J_b = \partial f_b / \partial \theta`` and a symmetric positive
semi-definite matrix ``M_b`` in output space,

.. math::

    C v = \frac{1}{W} \sum_b w_b \, J_b^\top M_b \, (J_b v).

The operators differ only in ``M_b``: the loss Hessian ``\nabla^2_f L_b`` (GGN),
``I / B`` on the per-sample losses (empirical Fisher), or the outer products of
sampled-label gradients (Monte-Carlo Fisher). Per batch, a block ``V`` of ``b`` vectors
costs two calls of the output function whatever ``b`` (``one_pass=False``, the GGN's and
MC Fisher's default: the memory of one training step): a forward-mode pass without graph
for the ``b`` tangents ``J_b V`` (dual parameters for one vector, ``torch.func.vmap`` over
the tangents for several), then a forward that records the output's reverse graph. With
``one_pass=True`` (the empirical Fisher's default) the two are one call: the tangents
ride along the recorded forward (faster; about 1.5x the peak memory).
Then ``M_b (J_b v_j)`` in output space and one reverse pass ``J_b^\top u_j`` per vector (a
loop over the retained graph, or batched with ``is_grads_batched``). No double backward
anywhere (except with ``keep_graphs=True``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from torch import nn

from hessian_eigenthings.operators._autodiff_safety import curvature_mode
from hessian_eigenthings.operators._compute_dtype import FDStep, observed_compute_dtype
from hessian_eigenthings.operators._data import Piece
from hessian_eigenthings.operators._finite_difference import default_fd_eps
from hessian_eigenthings.operators._guard import preserve_model_state
from hessian_eigenthings.operators._jvp import JVP_METHODS, OutputJVP
from hessian_eigenthings.operators._lm_head import chunked_head
from hessian_eigenthings.operators._user_fns import (
    check_callable,
    check_graph,
    check_tensor_output,
)
from hessian_eigenthings.operators.data_operator import DataCurvatureOperator, DataOptions

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["OutputCurvatureOperator"]

OutputFn = Callable[[nn.Module, Any], torch.Tensor]


class _Linearisation(NamedTuple):
    """A piece's output with its graph, and ``g(u) = J^T u`` built with ``create_graph``.

    ``J v = d<g(u), v>/du`` is one reverse pass through ``g``'s graph, ``J^T u`` one
    through the output's: both reuse the graph, so kept graphs need no forward pass.
    """

    out: torch.Tensor
    u: torch.Tensor
    grads: list[torch.Tensor]
    which: list[int]


class OutputCurvatureOperator(DataCurvatureOperator):
    r"""Base of the operators ``(1/W) sum_b w_b J_b^T M_b J_b``; subclasses supply ``M_b``.

    A subclass implements :meth:`_output_product` (``M_b u`` in output space) and
    :meth:`_probe_loss`; this class owns the output function and its checks, the
    Jacobian-vector product ``J_b v`` (``jvp="forward"``: exact forward-mode AD;
    ``"finite_difference"``: central difference of outputs with step ``fd_eps``, two
    extra forward passes per vector, parameters restored bit for bit) and the reverse
    pass ``J_b^T u``.

    Default (``one_pass=False``): the tangents of the block in a forward-mode pass
    without graph (its activations freed layer by layer), then an ordinary forward with
    graph: two calls of the output function per batch and block, the peak memory of a
    training step. ``one_pass=True`` carries the tangents in the forward that records
    the graph: one call, faster, but while the forward runs the tangents and what their
    recorded operations save are alive too (about one more set of activations per
    vector, freed before the reverse passes; 1.4-1.6x the peak of the two-call product
    on a 1.1M-parameter MLP, ``benchmarks/bench_block_products.py``); ``max_block`` caps
    the vectors per forward.

    ``keep_graphs=True`` (``jvp="forward"``) keeps, for every (micro)batch, the output's
    graph and the graph of ``g(u) = J_b^T u`` built with ``create_graph=True``, so that a
    later product needs no forward: ``J_b v = \partial \langle g(u), v \rangle /
    \partial u`` and ``J_b^T u`` are reverse passes through them (this path needs the
    double backward of every layer, as the Hessian does). Memory: about the peak of a
    Hessian-vector product per (micro)batch, for all of them at once.

    Args:
        model: The model; never modified.
        dataloader: Re-iterable of batches (or a factory returning one).
        output_fn: ``output_fn(model, batch) -> output`` tensor.
        what: The name of ``output_fn`` in messages (``"forward_fn"``, ``"loss_fn"``).
        jvp: ``"forward"`` or ``"finite_difference"``.
        fd_eps: Finite-difference step for the unit direction; default
            :func:`~hessian_eigenthings.operators.hessian.default_fd_eps` of the dtype the
            model computes in (observed in one forward at construction, and lowered to
            an enclosing ``torch.autocast`` dtype at each product; see
            :mod:`~hessian_eigenthings.operators._compute_dtype`).
        one_pass: ``jvp="forward"``: carry the tangents in the forward that records the
            graph (``True``: one call per batch, about 1.5x a training step's peak
            memory) or run them in their own pass without graph first (``False``,
            default: two calls, a training step's peak memory).
        loss_for_weights: The loss whose ``batch_weight`` is the default ``weight_fn``.
        lm_head: ``"auto"``, ``"chunked"`` or ``"off"``: whether to chunk a language
            model's output embedding over tokens when ``head_loss`` declares itself its
            cross entropy (see :mod:`~hessian_eigenthings.operators._lm_head`).
        lm_head_chunk: Tokens per chunk (default ``2^22 / V``).
        head_loss: The loss that may declare ``head_ce`` (``None``: never chunk).
        **options: The data-loop options of :class:`DataCurvatureOperator`.
    """

    psd = True

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        output_fn: OutputFn,
        *,
        what: str,
        jvp: str = "forward",
        fd_eps: float | None = None,
        one_pass: bool = False,
        loss_for_weights: Any = None,
        lm_head: str = "auto",
        lm_head_chunk: int | None = None,
        head_loss: Any = None,
        **options: Unpack[DataOptions],
    ) -> None:
        owner = type(self).__name__
        if jvp not in JVP_METHODS:
            raise ValueError(f"Unknown jvp {jvp!r} for {owner}; expected one of {JVP_METHODS}.")
        if fd_eps is not None and not fd_eps > 0:
            raise ValueError(f"fd_eps must be positive, got {fd_eps!r}.")
        check_callable(output_fn, what, "(model, batch) -> tensor")
        self._output_fn = output_fn
        self._what = what
        self.jvp = jvp
        self.one_pass = bool(one_pass)
        # the determinism probe runs once the LM head is set up (it may chunk the probe too)
        check = options.get("check_determinism", True)
        options["check_determinism"] = False
        super().__init__(model, dataloader, loss_for_weights=loss_for_weights, **options)
        self.fd_eps = fd_eps if fd_eps is not None else default_fd_eps(self.dtype)
        step = None
        if jvp == "finite_difference":  # the step of the dtype the model computes in
            piece = self.source.microbatches(self.source.first_batch())[0]
            with preserve_model_state(self.model), torch.no_grad():
                compute = observed_compute_dtype(lambda: self._output(self.model, piece))
            step = FDStep(self.dtype, fd_eps=fd_eps, compute=compute, owner=owner)
            self.fd_eps = step.eps
        self._jvp = OutputJVP(model, self._output, self.named_params, fd_eps=self.fd_eps, what=what)
        self._jvp.fd_step = step
        self._head = chunked_head(
            mode=lm_head,
            owner=owner,
            model=self.model,
            named_params=self.named_params,
            loss=head_loss,
            forward_fn=output_fn,
            first_batch=self.source.first_batch,
            chunk=lm_head_chunk,
            device=self.device,
            dtype=self.dtype,
            unsupported=(
                "finite-difference JVPs (jvp='forward' chunks)"
                if jvp != "forward"
                else "keep_graphs keeps each batch's whole graph (logits included)"
                if self._graphs is not None
                else None
            ),
            per_sample=self._per_sample_head,
        )
        if check:
            self._check_determinism()

    # -- subclass hooks -----------------------------------------------------------------
    # Whether the chunked LM-head product is the empirical Fisher's (per-sequence losses)
    # rather than the GGN's (a mean token loss); see ``head_loss``.
    _per_sample_head = False

    @abstractmethod
    def _output_product(self, out: torch.Tensor, piece: Piece, u: torch.Tensor) -> torch.Tensor:
        """``M_b u`` for the (detached) output ``out`` of ``piece`` and ``u = J_b v``.

        Linear in ``u`` and of the output's shape; ``piece`` carries the batch, its
        (batch, microbatch) index and its weight.
        """

    def _output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The output ``f(theta, x_b)`` whose Jacobian the operator uses, checked."""
        return check_tensor_output(self._output_fn(model, batch), self._what)

    def _graph_probe(self, batch: Any) -> None:
        check_graph(self._output(self.model, batch), self._what, "an output")

    # -- the product ---------------------------------------------------------------------
    def _snapshot_params(self) -> Sequence[nn.Parameter]:
        return self.params if self.jvp == "finite_difference" else ()

    def _keep_graphs_unsupported(self) -> str | None:
        if self.jvp == "finite_difference":
            return "jvp='finite_difference' evaluates the output at new points for every vector"
        return None

    def _output_products(self, out: torch.Tensor, piece: Piece, us: torch.Tensor) -> torch.Tensor:
        """``M_b u_j`` for the rows of ``us`` (``(b, *out.shape)``); default column by column."""
        return torch.stack([self._output_product(out, piece, u) for u in us])

    def _piece_product(
        self, piece: Piece, vs: Sequence[torch.Tensor]
    ) -> Sequence[torch.Tensor | None]:
        prods = self._piece_products(piece, [v.unsqueeze(0) for v in vs])
        return [None if h is None else h[0] for h in prods]

    def _piece_products(
        self, piece: Piece, vs: Sequence[torch.Tensor]
    ) -> Sequence[torch.Tensor | None]:
        if self._head is not None:  # the LM head chunked over tokens; the block shares the forward
            head = self._head.fisher if self._per_sample_head else self._head.ggn
            cols = [
                col
                for chunk in self._chunks(vs[0].shape[0])
                for col in head(piece, [v[chunk] for v in vs])
            ]
            return self._stack_columns(cols, vs)
        chunks = self._chunks(vs[0].shape[0])
        parts = [self._chunk_products(piece, [v[cols] for v in vs]) for cols in chunks]
        return [
            None if parts[0][i] is None else torch.cat([p[i] for p in parts])  # type: ignore[misc]
            for i in range(len(self.params))
        ]

    def _chunk_products(
        self, piece: Piece, vs: Sequence[torch.Tensor]
    ) -> Sequence[torch.Tensor | None]:
        """``J^T M J V`` for one chunk of vectors: ``J V``, ``M (J V)``, ``J^T (M J V)``."""
        count = vs[0].shape[0]
        keep = self._graphs is not None
        if keep:
            # the kept linearisation is differentiated twice: twice-differentiable kernels
            with curvature_mode(self.device, self.dtype):
                lin = self._kept(piece, lambda: self._linearisation(piece))
                if lin is None:  # no selected parameter reaches the output
                    return [None] * len(self.params)
                out = lin.out
                # J V = d<g(u), V>/du: not None, every kept gradient depends on u
                jv = cast(
                    torch.Tensor,
                    self._reverse(lin.grads, [lin.u], [vs[i] for i in lin.which], retain=True)[0],
                )
        elif self.jvp == "finite_difference":
            fd = self._jvp.finite_difference
            jv = torch.stack([fd(piece.data, [v[j] for v in vs]) for j in range(count)])
            out = self._output(self.model, piece.data)
        else:
            out, jv = self._jvp.with_graph(piece.data, vs, one_pass=self.one_pass)
        if jv.shape[1:] != out.shape:
            raise ValueError(
                f"{self._what} returned outputs of different shapes in two calls "
                f"({tuple(jv.shape[1:])} vs {tuple(out.shape)}) on the same batch."
            )
        if not out.requires_grad:  # no selected parameter reaches the output
            return [None] * len(self.params)
        u = self._output_products(out.detach(), piece, jv)
        del jv
        return self._reverse([out], self.params, [u.to(out.dtype)], retain=keep)

    def _reverse(
        self,
        outputs: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        cotangents: Sequence[torch.Tensor],
        *,
        retain: bool,
    ) -> list[torch.Tensor | None]:
        """``(d outputs / d inputs)^T`` times each row of ``cotangents``, as ``(b, ...)``."""
        count = cotangents[0].shape[0]
        if self.block_mode == "vmap" and count > 1:
            grads = torch.autograd.grad(
                outputs,
                inputs,
                cotangents,
                retain_graph=retain,
                allow_unused=True,
                is_grads_batched=True,
            )
            return [None if g is None else g.detach() for g in grads]
        cols = [
            torch.autograd.grad(
                outputs,
                inputs,
                [c[j] for c in cotangents],
                retain_graph=retain or j < count - 1,
                allow_unused=True,
            )
            for j in range(count)
        ]
        return [
            None if cols[0][i] is None else torch.stack([c[i] for c in cols]).detach()
            for i in range(len(inputs))
        ]

    def _linearisation(self, piece: Piece) -> _Linearisation | None:
        """The kept graphs of a piece (``keep_graphs=True``): output and ``J^T u``."""
        out = self._output(self.model, piece.data)
        if not out.requires_grad:
            return None
        u = torch.zeros_like(out, requires_grad=True)
        grads = torch.autograd.grad(out, self.params, u, create_graph=True, allow_unused=True)
        which = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not which:
            return None
        return _Linearisation(out, u, [grads[i] for i in which], which)

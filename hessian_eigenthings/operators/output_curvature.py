r"""Curvature through the model's output: ``J^T M_b J``, the base of the GGN and Fishers.

For an output ``f_b = f(\theta, x_b)`` of batch ``b`` (logits, or the per-sample losses)
with Jacobian ``J_b = \partial f_b / \partial \theta`` and a symmetric positive
semi-definite matrix ``M_b`` in output space,

.. math::

    C v = \frac{1}{W} \sum_b w_b \, J_b^\top M_b \, (J_b v).

The operators differ only in ``M_b``: the loss Hessian ``\nabla^2_f L_b`` (GGN),
``I / B`` on the per-sample losses (empirical Fisher), or the outer products of
sampled-label gradients (Monte-Carlo Fisher). Per batch a product costs one
forward-mode pass for ``J_b v`` (no graph kept), one ordinary forward, the product
``M_b (J_b v)`` in output space, and one reverse pass for ``J_b^\top u``: the memory of
one training step, without a double backward anywhere.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

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

__all__ = ["OutputCurvatureOperator", "vjp_params"]

OutputFn = Callable[[nn.Module, Any], torch.Tensor]


def vjp_params(
    out: torch.Tensor, params: Sequence[nn.Parameter], cotangent: torch.Tensor
) -> list[torch.Tensor | None]:
    """``J^T u``: one reverse pass from ``out`` with ``grad_outputs=u`` (``None``: zero)."""
    if not out.requires_grad:  # no selected parameter reaches the output
        return [None] * len(params)
    grads = torch.autograd.grad(
        out, list(params), grad_outputs=cotangent.to(out.dtype), allow_unused=True
    )
    return list(grads)


class OutputCurvatureOperator(DataCurvatureOperator):
    r"""Base of the operators ``(1/W) sum_b w_b J_b^T M_b J_b``; subclasses supply ``M_b``.

    A subclass implements :meth:`_output_product` (``M_b u`` in output space) and
    :meth:`_probe_loss`; this class owns the output function and its checks, the
    Jacobian-vector product ``J_b v`` (``jvp="forward"``: exact forward-mode AD;
    ``"finite_difference"``: central difference of outputs with step ``fd_eps``,
    parameters restored bit for bit) and the reverse pass ``J_b^T u``.

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
        self._jvp = OutputJVP(
            model, self._output, self.named_params, method=jvp, fd_eps=self.fd_eps, what=what
        )
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
            unsupported=None
            if jvp == "forward"
            else "finite-difference JVPs (jvp='forward' chunks)",
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

    def _piece_product(
        self, piece: Piece, vs: Sequence[torch.Tensor]
    ) -> Sequence[torch.Tensor | None]:
        if self._head is not None:  # the LM head chunked over tokens
            if self._per_sample_head:
                return self._head.fisher(piece, vs)
            return self._head.ggn(piece, vs)
        # Per vector: J v, then M_b u and J^T u; the forward (``out`` and its graph)
        # depends on the piece only, so a block of vectors can share it.
        jv = self._jvp(piece.data, vs)  # no graph kept: peak memory of an inference forward
        out = self._output(self.model, piece.data)
        if jv.shape != out.shape:
            raise ValueError(
                f"{self._what} returned outputs of different shapes in two calls "
                f"({tuple(jv.shape)} vs {tuple(out.shape)}) on the same batch."
            )
        u = self._output_product(out.detach(), piece, jv)
        del jv
        return vjp_params(out, self.params, u)

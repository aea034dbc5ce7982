r"""The exact Generalized Gauss-Newton matrix ``J^T H_loss J`` of the mean loss.

For a model output ``f(\theta, x_b)`` on batch ``b`` and a loss of the output
``L_b(f)`` (the batch's mean loss), the GGN of the dataset mean loss is

.. math::

    G = \frac{1}{W} \sum_b w_b \, J_b^\top H_b J_b, \qquad
    J_b = \frac{\partial f(\theta, x_b)}{\partial \theta}, \quad
    H_b = \nabla^2_f L_b,

(Schraudolph, 2002, "Fast curvature matrix-vector products for second-order gradient
descent"; Martens, 2020, "New insights and perspectives on the natural gradient
method"). It is positive semi-definite whenever the loss is convex in the output
(cross-entropy, squared error) and equals the Hessian without the term that involves
the model's second derivatives.

One product ``G v`` costs a forward-mode pass for the tangent ``J v`` (no graph), a
forward that records the graph for the reverse pass, the loss's closed-form
``H_b (J v)`` and one reverse pass (``J^T u``), without a double backward anywhere: the
peak memory of a training step. A block of vectors shares both forwards;
``one_pass=True`` merges them into one (faster, about 1.5x the memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hessian_eigenthings.operators._data import Piece
from hessian_eigenthings.operators._user_fns import check_callable, check_graph, check_scalar_loss
from hessian_eigenthings.operators.data_operator import DataOptions
from hessian_eigenthings.operators.output_curvature import OutputCurvatureOperator, OutputFn

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["GGNOperator"]

ForwardFn = OutputFn
LossOfOutputFn = Callable[[torch.Tensor, Any], torch.Tensor]

_LOSS_HVP_METHODS = ("analytical", "autograd")


class GGNOperator(OutputCurvatureOperator):
    r"""Generalized Gauss-Newton ``G = J^T H_loss J`` of the mean loss over a dataset.

    .. math::

        G v = \frac{1}{W} \sum_b w_b \, J_b^\top \, H_b \, (J_b v),

    with ``J_b`` the Jacobian of ``forward_fn(model, batch_b)`` with respect to the
    selected parameters, ``H_b`` the Hessian of ``loss_of_output_fn(output, batch_b)``
    with respect to the output, and ``w_b`` the batch weight (samples, or non-ignored
    tokens via the loss's ``batch_weight``), so ragged batches and token losses give the
    GGN of the mean over all samples (tokens). Schraudolph (2002); Martens (2020).

    Per batch and block of vectors: a forward-mode pass without graph gives the
    tangents ``J v_j`` of the block's vectors, a forward with graph the output; then the
    loss's closed-form ``H (J v_j)`` and one backward pass per vector, and no double
    backward through the softmax (see
    :class:`~hessian_eigenthings.operators.output_curvature.OutputCurvatureOperator`).
    Memory: that of a training step (the SPEC's contract). ``one_pass=True`` carries the
    tangents in the forward with graph (one call of ``forward_fn`` instead of two): on a
    deep MLP its peak is 1.4-1.6x a training step's; for a vocabulary-sized output
    layer, where PyTorch's JVP formulas materialise the primal, the tangent and their
    partial products, both are 1.5x a gradient step at 8k classes
    (``benchmarks/bench_ggn_memory.py``).
    ``microbatch_size`` and ``max_block`` bound it without changing the result. A model
    whose forward updates buffers in place (train-mode BatchNorm) gets one forward-mode
    pass per vector plus one forward with graph, since ``torch.func`` cannot batch
    tangents through in-place buffer updates.

    Options:
        ``loss_hvp="analytical"`` (default) uses ``loss_of_output_fn.hvp(output, batch,
        u)`` (see :mod:`hessian_eigenthings.loss_fns.standard`, or attach one with
        :func:`~hessian_eigenthings.loss_fns.base.loss_of_output`). ``"autograd"``
        computes ``H u`` by double backward of the loss with respect to the output only
        (any loss; costs output-sized extra memory).

        ``jvp="forward"`` (default) is exact forward-mode AD. Layers without a
        forward-mode derivative raise an error naming the layer; then use
        ``jvp="finite_difference"``: central difference of outputs along ``v / ||v||``
        with step ``fd_eps`` (default :func:`default_fd_eps` of the model dtype), linear
        in ``v``, parameters restored bit for bit.

    Args:
        model: The model; never modified.
        dataloader: Re-iterable of batches (or a factory returning one).
        forward_fn: ``forward_fn(model, batch) -> output`` tensor (e.g. logits), see
            :func:`~hessian_eigenthings.loss_fns.standard.supervised_forward`.
        loss_of_output_fn: ``(output, batch) -> scalar`` mean loss of the batch, convex
            in the output, with ``.hvp`` for the analytical path.
        loss_hvp: ``"analytical"`` or ``"autograd"``.
        jvp: ``"forward"`` or ``"finite_difference"``.
        fd_eps: Finite-difference step for the unit direction (``jvp="finite_difference"``).
        lm_head: ``"auto"`` (default): with a language-model loss of the library
            (:func:`~hessian_eigenthings.loss_fns.huggingface.hf_lm_loss_of_output`,
            :func:`~hessian_eigenthings.loss_fns.transformer_lens.tlens_loss_of_output`)
            on a model whose logits ``forward_fn`` returns straight from its linear output
            embedding, the ``(tokens, V)`` logits and their tangents are never formed:
            the head and the loss are applied in chunks of tokens (exact; see
            :mod:`~hessian_eigenthings.operators._lm_head`). ``"chunked"``: the same,
            raising where it does not apply; ``"off"``: never.
        lm_head_chunk: Tokens per chunk (default ``2^22 / V``: 16 MiB of float32 logits).
        one_pass: ``True`` carries the forward-mode tangents in the forward that records
            the graph: one forward per batch and block instead of two, faster, but about
            1.5x the peak memory (it also holds what the tangents' operations save). The
            default ``False`` has the peak memory of a training step.
        **options: The data-loop options of
            :class:`~hessian_eigenthings.operators.data_operator.DataCurvatureOperator`
            (``param_filter``, ``full_dataset``, ``num_batches``, ``microbatch_size``,
            ``weight_fn``, ``check_determinism``, ``backend``, ``block_mode``,
            ``max_block``, ``keep_graphs``); ``weight_fn`` defaults to
            ``loss_of_output_fn.batch_weight`` or the batch size.

    Example:
        >>> from hessian_eigenthings.loss_fns.standard import (
        ...     cross_entropy_loss_of_output, supervised_forward)
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 4)
        >>> data = [(torch.randn(8, 3), torch.randint(0, 4, (8,)))]
        >>> G = GGNOperator(model, data, supervised_forward, cross_entropy_loss_of_output())
        >>> v = torch.randn(G.size)
        >>> bool(v @ G.matvec(v) > 0)  # positive semi-definite
        True
    """

    _probe_is_mean_loss = True

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        forward_fn: ForwardFn,
        loss_of_output_fn: LossOfOutputFn,
        *,
        loss_hvp: str = "analytical",
        jvp: str = "forward",
        fd_eps: float | None = None,
        lm_head: str = "auto",
        lm_head_chunk: int | None = None,
        one_pass: bool = False,
        **options: Unpack[DataOptions],
    ) -> None:
        if loss_hvp not in _LOSS_HVP_METHODS:
            raise ValueError(
                f"Unknown loss_hvp {loss_hvp!r} for GGNOperator; expected one of "
                f"{_LOSS_HVP_METHODS}."
            )
        check_callable(loss_of_output_fn, "loss_of_output_fn", "(output, batch) -> loss")
        if loss_hvp == "analytical":
            has_hvp = getattr(loss_of_output_fn, "has_hvp", None)
            if has_hvp is None:
                has_hvp = callable(getattr(loss_of_output_fn, "hvp", None))
            if not has_hvp:
                name = getattr(loss_of_output_fn, "name", None) or getattr(
                    loss_of_output_fn, "__name__", type(loss_of_output_fn).__name__
                )
                raise ValueError(
                    f"GGNOperator(loss_hvp='analytical') needs a loss with a closed-form "
                    f".hvp(output, batch, u), but {name!r} has none. Use a loss from "
                    "hessian_eigenthings.loss_fns.standard, attach one with "
                    "loss_of_output(fn, hvp=...), or pass loss_hvp='autograd'."
                )
        self.forward_fn = forward_fn
        self.loss_of_output_fn = loss_of_output_fn
        self.loss_hvp = loss_hvp
        super().__init__(
            model,
            dataloader,
            forward_fn,
            what="forward_fn",
            jvp=jvp,
            fd_eps=fd_eps,
            one_pass=one_pass,
            loss_for_weights=loss_of_output_fn,
            lm_head=lm_head,
            lm_head_chunk=lm_head_chunk,
            head_loss=loss_of_output_fn,
            **options,
        )

    def _loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        return check_scalar_loss(self.loss_of_output_fn(output, batch), "loss_of_output_fn")

    def _probe_loss(self, batch: Any) -> torch.Tensor:
        if self._head is not None:
            return self._head.probe(batch)
        return self._loss(self._output(self.model, batch), batch).detach()

    def _graph_probe(self, batch: Any) -> None:
        out = self._output(self.model, batch)
        check_graph(out, "forward_fn", "an output")
        if self.loss_hvp == "autograd":  # differentiated twice with respect to the output
            o = out.detach().requires_grad_(True)
            check_graph(
                self._loss(o, batch), "loss_of_output_fn", "a loss", "the output it got did"
            )

    def _output_product(self, out: torch.Tensor, piece: Piece, u: torch.Tensor) -> torch.Tensor:
        """``H_loss u`` with respect to the (detached) output."""
        if self.loss_hvp == "analytical":
            hu = self.loss_of_output_fn.hvp(out, piece.data, u)  # type: ignore[attr-defined]
        else:
            with torch.enable_grad():
                o = out.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self._loss(o, piece.data), o, create_graph=True)
                if not g.requires_grad:  # loss linear in the output
                    return torch.zeros_like(u)
                (hu,) = torch.autograd.grad(g, o, grad_outputs=u)
        if not isinstance(hu, torch.Tensor) or hu.shape != out.shape:
            got = tuple(hu.shape) if isinstance(hu, torch.Tensor) else type(hu).__name__
            raise ValueError(
                f"The loss's hvp must return a tensor of the output's shape "
                f"{tuple(out.shape)}, got {got}."
            )
        return hu

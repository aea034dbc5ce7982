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

One product ``G v`` costs one forward-mode pass (``J v``), the loss's closed-form
``H_b (J v)``, and one reverse pass (``J^T u``): the memory of one training step,
without a double backward anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from hessian_eigenthings.backends.base import LinAlgBackend
from hessian_eigenthings.operators._data import WeightFn
from hessian_eigenthings.operators.data_operator import DataCurvatureOperator
from hessian_eigenthings.operators.hessian import default_fd_eps
from hessian_eigenthings.param_utils import ParamFilterLike

__all__ = ["GGNOperator"]

ForwardFn = Callable[[nn.Module, Any], torch.Tensor]

_JVP_METHODS = ("forward", "finite_difference")
_LOSS_HVP_METHODS = ("analytical", "autograd")


class _Call(nn.Module):
    """``fn(model, batch)`` as a module, so ``functional_call`` swaps the model's params."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)


def _check_output(out: Any, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{what} must return a tensor, got {type(out).__name__}. For models returning "
            "an output object, return the tensor itself (e.g. model(**batch).logits)."
        )
    if not out.is_floating_point():
        raise TypeError(f"{what} must return a floating tensor, got dtype {out.dtype}.")
    return out


def _innermost_failing_module(model: nn.Module, thunk: Callable[[], Any]) -> str | None:
    """Run ``thunk`` with temporary hooks; name the innermost module active when it raised."""
    stack: list[str] = []
    failed: list[str] | None = None
    handles = []
    for name, module in model.named_modules():
        label = f"{name or '<root>'} ({type(module).__name__})"

        def pre(_m: nn.Module, _args: Any, label: str = label) -> None:
            stack.append(label)

        def post(_m: nn.Module, _args: Any, _out: Any) -> None:
            if stack:
                stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        thunk()
    except Exception:  # the error itself was already caught by the caller; only locate it
        failed = list(stack)
    finally:
        for h in handles:
            h.remove()
    if not failed:
        return None
    return failed[-1]


class OutputJVP:
    r"""Jacobian-vector products ``J v`` of ``fn(model, batch)`` w.r.t. selected parameters.

    ``"forward"``: exact, by forward-mode AD (dual tensors through
    :func:`torch.func.functional_call` under ``torch.no_grad``: no reverse graph is kept,
    so the peak memory is that of one inference forward with tangents).

    ``"finite_difference"``: ``J v ~ ||v|| (f(\theta + h u) - f(\theta - h u)) / (2h)``
    along ``u = v / ||v||``, error ``O(h^2)``; parameters restored bit for bit.

    Shared by the GGN and Fisher operators; not part of the public API.
    """

    def __init__(
        self,
        model: nn.Module,
        fn: Callable[[nn.Module, Any], Any],
        named_params: Sequence[tuple[str, nn.Parameter]],
        *,
        method: str,
        fd_eps: float,
        what: str,
    ) -> None:
        self.model = model
        self.fn = fn
        self._call = _Call(model, fn)
        self.names = ["model." + n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.method = method
        self.fd_eps = fd_eps
        self.what = what

    def __call__(self, batch: Any, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.method == "finite_difference":
            return self._finite_difference(batch, vs)
        return self._forward_mode(batch, vs)

    def _dual_forward(self, batch: Any, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), fwAD.dual_level():
            duals = {
                n: fwAD.make_dual(p.detach(), v) for n, p, v in zip(self.names, self.params, vs)
            }
            out = _check_output(functional_call(self._call, duals, (batch,)), self.what)
            primal, tangent = fwAD.unpack_dual(out)
            if tangent is None:  # the output does not depend on the selected parameters
                tangent = torch.zeros_like(primal)
        return tangent

    def _forward_mode(self, batch: Any, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        try:
            return self._dual_forward(batch, vs)
        except torch.OutOfMemoryError:
            raise
        except (NotImplementedError, RuntimeError) as err:
            with torch.no_grad():
                self.fn(self.model, batch)  # a plain forward failing too: not a forward-AD issue
            where = _innermost_failing_module(self.model, lambda: self._dual_forward(batch, vs))
            location = f"in module {where}" if where else f"in {self.what} (outside any module)"
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise RuntimeError(
                f"Forward-mode AD (the exact Jacobian-vector product) failed {location}: "
                f"{type(err).__name__}: {first_line}. This layer or an op inside it has no "
                "forward-mode derivative (e.g. a custom autograd.Function without a jvp "
                "staticmethod). Fall back to jvp='finite_difference' (central difference of "
                "outputs, error O(h^2)), or give the custom Function a jvp."
            ) from err

    def _finite_difference(self, batch: Any, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        # u = v / ||v|| with the norm in float64 on the device (no host sync)
        vnorm = torch.stack([v.double().square().sum() for v in vs]).sum().sqrt()
        scale = torch.where(vnorm > 0, 1.0 / vnorm, torch.zeros_like(vnorm))
        h = self.fd_eps
        base = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, b, v in zip(self.params, base, vs):
                    p.copy_(b + (h * scale).to(p.dtype) * v)
                out_plus = _check_output(self.fn(self.model, batch), self.what)
                for p, b, v in zip(self.params, base, vs):
                    p.copy_(b - (h * scale).to(p.dtype) * v)
                out_minus = _check_output(self.fn(self.model, batch), self.what)
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, base):
                    p.copy_(b)
        # the difference of two nearby floats is exact in their own dtype (Sterbenz), so no
        # float64 copies of the (possibly vocabulary-sized) outputs are needed
        diff = out_plus - out_minus
        del out_plus, out_minus
        return diff.mul_((vnorm / (2 * h)).to(diff.dtype))


def validate_jvp_options(jvp: str, fd_eps: float | None, owner: str) -> None:
    """Check the ``jvp`` / ``fd_eps`` options shared by the GGN and Fisher operators."""
    if jvp not in _JVP_METHODS:
        raise ValueError(f"Unknown jvp {jvp!r} for {owner}; expected one of {_JVP_METHODS}.")
    if fd_eps is not None and not fd_eps > 0:
        raise ValueError(f"fd_eps must be positive, got {fd_eps!r}.")


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


class GGNOperator(DataCurvatureOperator):
    r"""Generalized Gauss-Newton ``G = J^T H_loss J`` of the mean loss over a dataset.

    .. math::

        G v = \frac{1}{W} \sum_b w_b \, J_b^\top \, H_b \, (J_b v),

    with ``J_b`` the Jacobian of ``forward_fn(model, batch_b)`` with respect to the
    selected parameters, ``H_b`` the Hessian of ``loss_of_output_fn(output, batch_b)``
    with respect to the output, and ``w_b`` the batch weight (samples, or non-ignored
    tokens via the loss's ``batch_weight``), so ragged batches and token losses give the
    GGN of the mean over all samples (tokens). Schraudolph (2002); Martens (2020).

    Per product and batch (default path): one forward-mode pass for ``J v`` (no graph
    kept), one ordinary forward, the loss's closed-form ``H (J v)`` and one backward
    pass, and no double backward through the softmax. Memory: the forward-mode pass keeps
    no graph, so for deep models the peak is that of a training step; for a
    vocabulary-sized output layer PyTorch's JVP formulas materialise the primal, the
    tangent and their partial products (about 5 logits-sized tensors, 1.8x the peak of a
    gradient step at 32k classes; ``benchmarks/bench_ggn_memory.py``).
    ``microbatch_size`` bounds it without changing the result.

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
        param_filter: Which parameters span the operator; default all trainable ones.
        full_dataset: All batches per matvec (``True``) or the next batch (``False``).
        num_batches: Use only the first ``num_batches`` batches.
        microbatch_size: Split batches to bound memory; the result is unchanged.
        fd_eps: Finite-difference step for the unit direction (``jvp="finite_difference"``).
        weight_fn: ``batch -> weight``; default ``loss_of_output_fn.batch_weight`` or the
            batch size.
        check_determinism: Raise at construction if the loss is random (dropout).
        backend: Vector backend for algorithms.

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

    psd = True

    def __init__(
        self,
        model: nn.Module,
        dataloader: Iterable[Any] | Callable[[], Iterable[Any]],
        forward_fn: ForwardFn,
        loss_of_output_fn: Callable[[torch.Tensor, Any], torch.Tensor],
        *,
        loss_hvp: str = "analytical",
        jvp: str = "forward",
        param_filter: ParamFilterLike = None,
        full_dataset: bool = True,
        num_batches: int | None = None,
        microbatch_size: int | None = None,
        fd_eps: float | None = None,
        weight_fn: WeightFn | None = None,
        check_determinism: bool = True,
        backend: LinAlgBackend | None = None,
    ) -> None:
        if loss_hvp not in _LOSS_HVP_METHODS:
            raise ValueError(
                f"Unknown loss_hvp {loss_hvp!r} for GGNOperator; expected one of "
                f"{_LOSS_HVP_METHODS}."
            )
        validate_jvp_options(jvp, fd_eps, "GGNOperator")
        if not callable(forward_fn):
            raise TypeError(
                f"forward_fn must be callable (model, batch) -> output, got {forward_fn!r}."
            )
        if not callable(loss_of_output_fn):
            raise TypeError(
                f"loss_of_output_fn must be callable (output, batch) -> loss, got "
                f"{loss_of_output_fn!r}."
            )
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
        self.jvp = jvp
        super().__init__(
            model,
            dataloader,
            param_filter=param_filter,
            full_dataset=full_dataset,
            num_batches=num_batches,
            microbatch_size=microbatch_size,
            weight_fn=weight_fn,
            loss_for_weights=loss_of_output_fn,
            check_determinism=check_determinism,
            backend=backend,
        )
        self.fd_eps = fd_eps if fd_eps is not None else default_fd_eps(self.dtype)
        self._jvp = OutputJVP(
            model, forward_fn, self.named_params, method=jvp, fd_eps=self.fd_eps, what="forward_fn"
        )

    def _forward(self, batch: Any) -> torch.Tensor:
        return _check_output(self.forward_fn(self.model, batch), "forward_fn")

    def _loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        loss = self.loss_of_output_fn(output, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_of_output_fn must return a scalar tensor (the batch's mean loss), got {got}."
            )
        return loss

    def _probe_loss(self, batch: Any) -> torch.Tensor:
        return self._loss(self._forward(batch), batch).detach()

    def _snapshot_params(self) -> Sequence[nn.Parameter]:
        return self.params if self.jvp == "finite_difference" else ()

    def _output_hvp(self, output: torch.Tensor, batch: Any, u: torch.Tensor) -> torch.Tensor:
        """``H_loss u`` with respect to the (detached) output."""
        if self.loss_hvp == "analytical":
            hu = self.loss_of_output_fn.hvp(output, batch, u)  # type: ignore[attr-defined]
        else:
            with torch.enable_grad():
                o = output.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self._loss(o, batch), o, create_graph=True)
                if not g.requires_grad:  # loss linear in the output
                    return torch.zeros_like(u)
                (hu,) = torch.autograd.grad(g, o, grad_outputs=u)
        if not isinstance(hu, torch.Tensor) or hu.shape != output.shape:
            got = tuple(hu.shape) if isinstance(hu, torch.Tensor) else type(hu).__name__
            raise ValueError(
                f"The loss's hvp must return a tensor of the output's shape "
                f"{tuple(output.shape)}, got {got}."
            )
        return hu

    def _batch_product(
        self, batch: Any, vs: Sequence[torch.Tensor]
    ) -> Sequence[torch.Tensor | None]:
        jv = self._jvp(batch, vs)  # no graph kept: peak memory of an inference forward
        out = self._forward(batch)
        if jv.shape != out.shape:
            raise ValueError(
                f"forward_fn returned outputs of different shapes in two calls "
                f"({tuple(jv.shape)} vs {tuple(out.shape)}) on the same batch."
            )
        u = self._output_hvp(out.detach(), batch, jv)
        del jv
        return vjp_params(out, self.params, u)

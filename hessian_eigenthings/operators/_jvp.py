r"""Jacobian-vector products of a model's output with respect to selected parameters.

The output-curvature operators (GGN, empirical and Monte-Carlo Fisher) need ``J v`` of
an output ``f(\theta, x_b)`` (logits, or per-sample losses) for every batch: by exact
forward-mode AD, or by a central difference of outputs when a layer has no forward-mode
derivative. A forward-mode failure is reported with the innermost module that raised.

:meth:`OutputJVP.with_graph` is the one-pass product's forward: a single call of the
output function gives the output, with its reverse-mode graph to the parameters (for
``J^T u``), and the tangents ``J V`` of a whole block (dual parameters for one vector;
``torch.func.vmap`` over the tangents of ``torch.func.jvp`` for several).

Forward-mode passes run inside
:func:`~hessian_eigenthings.operators._autodiff_safety.curvature_mode` (fused attention
kernels have no forward-mode derivative; the math kernel has); a forward without tangents
runs the user's kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, jvp, vmap

from hessian_eigenthings.operators._autodiff_safety import curvature_mode
from hessian_eigenthings.operators._compute_dtype import FDStep
from hessian_eigenthings.operators._finite_difference import perturbed_pair
from hessian_eigenthings.operators._user_fns import check_tensor_output

__all__ = ["JVP_METHODS", "OutputJVP"]

JVP_METHODS = ("forward", "finite_difference")


class _Call(nn.Module):
    """``fn(model, batch)`` as a module, so ``functional_call`` swaps the model's params."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)


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


def _updates_running_stats(model: nn.Module) -> bool:
    """Whether a forward updates buffers in place (a train-mode BatchNorm with running stats)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        for m in model.modules()
    )


class OutputJVP:
    r"""Jacobian-vector products ``J v`` of ``fn(model, batch)`` w.r.t. selected parameters.

    :meth:`with_graph`: exact, by forward-mode AD through
    :func:`torch.func.functional_call`, in the same call that builds the output's reverse
    graph (one forward pass for ``J V`` and ``J^T u``).

    :meth:`finite_difference`: ``J v ~ ||v|| (f(\theta + h u) - f(\theta - h u)) / (2h)``
    along ``u = v / ||v||``, error ``O(h^2)``, without graph; parameters restored bit for
    bit.

    Shared by the output-curvature operators; not part of the public API.
    """

    def __init__(
        self,
        model: nn.Module,
        fn: Callable[[nn.Module, Any], Any],
        named_params: Sequence[tuple[str, nn.Parameter]],
        *,
        fd_eps: float,
        what: str,
    ) -> None:
        self.model = model
        self.fn = fn
        self._call = _Call(model, fn)
        self.names = ["model." + n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.device = self.params[0].device
        self.dtype = functools.reduce(torch.promote_types, [p.dtype for p in self.params])
        self.fd_eps = fd_eps
        self.fd_step: FDStep | None = None  # set by the operator: the compute-dtype step
        self.what = what

    def _tangent_mode(self) -> Any:
        """The kernels of a forward-mode pass (see the module docstring)."""
        return curvature_mode(self.device, self.dtype)

    def with_graph(
        self, batch: Any, vs: Sequence[torch.Tensor], *, one_pass: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, J V)``: the output ``f`` with its graph to the parameters, and ``J V``.

        ``vs[i]`` has shape ``(b, *param_i.shape)``; ``J V`` has shape ``(b, *f.shape)``.
        ``one_pass=True``: one call of ``fn``, in which grad mode records the primal
        computation (for the reverse pass ``J^T u``) and that of the tangents (whose
        saved tensors, about one more set of activations, are freed with them before the
        reverse pass). ``False``: the tangents in a forward-mode pass without graph (freed
        layer by layer), then an ordinary forward with graph: two calls, the peak memory
        of a training step.
        """
        try:
            return self._with_graph(batch, vs, one_pass)
        except torch.OutOfMemoryError:
            raise
        except (NotImplementedError, RuntimeError) as err:
            self._explain(err, batch, [v[0] for v in vs])
            if vs[0].shape[0] == 1:
                raise
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise RuntimeError(
                "The batched forward-mode pass over a block (torch.func.vmap over the "
                f"tangents of {self.what}) failed: {type(err).__name__}: {first_line}. A "
                "single vector's pass works, so something in the model does not support "
                "vmap (e.g. .item() or data-dependent control flow on the output). Pass "
                "max_block=1 to the operator to multiply one vector per forward pass."
            ) from err

    def _with_graph(
        self, batch: Any, vs: Sequence[torch.Tensor], one_pass: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = vs[0].shape[0]
        if count > 1 and _updates_running_stats(self.model):
            # torch.func cannot carry a block of tangents through in-place buffer updates
            # (train-mode BatchNorm running statistics): one dual pass per vector (no graph),
            # then one forward with graph.
            jv = torch.stack([self._dual_forward(batch, [v[j] for v in vs]) for j in range(count)])
            with torch.enable_grad():
                return check_tensor_output(self.fn(self.model, batch), self.what), jv
        if not one_pass:
            if count == 1:
                jv = self._dual_forward(batch, [v[0] for v in vs]).unsqueeze(0)
            else:
                with torch.no_grad(), self._tangent_mode():
                    jv = self._vmapped(batch, vs, [p.detach() for p in self.params])[1]
            with torch.enable_grad():
                return check_tensor_output(self.fn(self.model, batch), self.what), jv
        if count == 1:
            with torch.enable_grad(), self._tangent_mode(), fwAD.dual_level():
                duals = {n: fwAD.make_dual(p, v[0]) for n, p, v in zip(self.names, self.params, vs)}
                out = check_tensor_output(functional_call(self._call, duals, (batch,)), self.what)
                primal, tangent = fwAD.unpack_dual(out)
            if tangent is None:  # the output does not depend on the selected parameters
                tangent = torch.zeros_like(primal)
            return primal, tangent.detach().unsqueeze(0)

        with torch.enable_grad(), self._tangent_mode():
            primal, tangent = self._vmapped(batch, vs, self.params)
        return primal, tangent.detach()

    def _vmapped(
        self, batch: Any, vs: Sequence[torch.Tensor], primals: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, J V)`` by ``torch.func.vmap`` over the tangents of ``torch.func.jvp``."""

        def forward(*ps: torch.Tensor) -> torch.Tensor:
            out = functional_call(self._call, dict(zip(self.names, ps)), (batch,))
            return check_tensor_output(out, self.what)

        def tangents(*ts: torch.Tensor) -> Any:
            return jvp(forward, tuple(primals), ts)

        # The primal does not depend on the tangents: one copy of it (out_dims None).
        out_dims: Any = (None, 0)
        primal, tangent = vmap(tangents, out_dims=out_dims)(*vs)
        return primal, tangent

    def _dual_forward(self, batch: Any, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), self._tangent_mode(), fwAD.dual_level():
            duals = {
                n: fwAD.make_dual(p.detach(), v) for n, p, v in zip(self.names, self.params, vs)
            }
            out = check_tensor_output(functional_call(self._call, duals, (batch,)), self.what)
            primal, tangent = fwAD.unpack_dual(out)
            if tangent is None:  # the output does not depend on the selected parameters
                tangent = torch.zeros_like(primal)
        return tangent

    def _explain(self, err: Exception, batch: Any, vs: Sequence[torch.Tensor]) -> None:
        """Raise the error naming the layer if one vector's forward-mode pass fails too.

        Returns (and lets the caller decide) when a single vector's pass works.
        """
        with torch.no_grad():
            self.fn(self.model, batch)  # a plain forward failing too: not a forward-AD issue
        failed: list[Exception] = []

        def single() -> None:
            try:
                self._dual_forward(batch, vs)
            except (NotImplementedError, RuntimeError) as e:
                failed.append(e)
                raise

        where = _innermost_failing_module(self.model, single)
        if not failed:
            return
        location = f"in module {where}" if where else f"in {self.what} (outside any module)"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise RuntimeError(
            f"Forward-mode AD (the exact Jacobian-vector product) failed {location}: "
            f"{type(err).__name__}: {first_line}. This layer or an op inside it has no "
            "forward-mode derivative (e.g. a custom autograd.Function without a jvp "
            "staticmethod). Fall back to jvp='finite_difference' (central difference of "
            "outputs, error O(h^2)), or give the custom Function a jvp."
        ) from err

    def finite_difference(self, batch: Any, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``J v`` of one vector by a central difference of outputs (no graph kept)."""

        def output() -> torch.Tensor:
            with torch.no_grad():
                return check_tensor_output(self.fn(self.model, batch), self.what)

        h = self.fd_eps if self.fd_step is None else self.fd_step.at_product(self.device)
        out_plus, out_minus, vnorm = perturbed_pair(self.params, vs, h, output)
        # the difference of two nearby floats is exact in their own dtype (Sterbenz), so no
        # float64 copies of the (possibly vocabulary-sized) outputs are needed
        diff = out_plus - out_minus
        del out_plus, out_minus
        return diff.mul_((vnorm / (2 * h)).to(diff.dtype))

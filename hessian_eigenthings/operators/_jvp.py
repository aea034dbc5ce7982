r"""Jacobian-vector products of a model's output with respect to selected parameters.

The output-curvature operators (GGN, empirical and Monte-Carlo Fisher) need ``J v`` of
an output ``f(\theta, x_b)`` (logits, or per-sample losses) for every batch: by exact
forward-mode AD, or by a central difference of outputs when a layer has no forward-mode
derivative. A forward-mode failure is reported with the innermost module that raised.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

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


class OutputJVP:
    r"""Jacobian-vector products ``J v`` of ``fn(model, batch)`` w.r.t. selected parameters.

    ``"forward"``: exact, by forward-mode AD (dual tensors through
    :func:`torch.func.functional_call` under ``torch.no_grad``: no reverse graph is kept,
    so the peak memory is that of one inference forward with tangents), inside
    :func:`~hessian_eigenthings.operators._autodiff_safety.curvature_mode` (fused
    attention kernels have no forward-mode derivative).

    ``"finite_difference"``: ``J v ~ ||v|| (f(\theta + h u) - f(\theta - h u)) / (2h)``
    along ``u = v / ||v||``, error ``O(h^2)``; parameters restored bit for bit.

    Shared by the output-curvature operators; not part of the public API.
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
        self.device = self.params[0].device
        self.dtype = functools.reduce(torch.promote_types, [p.dtype for p in self.params])
        self.method = method
        self.fd_eps = fd_eps
        self.fd_step: FDStep | None = None  # set by the operator: the compute-dtype step
        self.what = what

    def __call__(self, batch: Any, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.method == "finite_difference":
            return self._finite_difference(batch, vs)
        return self._forward_mode(batch, vs)

    def _dual_forward(self, batch: Any, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        # forward-mode AD: fused attention kernels have no JVP, the math kernel has
        with curvature_mode(self.device, self.dtype), torch.no_grad(), fwAD.dual_level():
            duals = {
                n: fwAD.make_dual(p.detach(), v) for n, p, v in zip(self.names, self.params, vs)
            }
            out = check_tensor_output(functional_call(self._call, duals, (batch,)), self.what)
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

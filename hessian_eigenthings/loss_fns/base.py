"""Losses of the model output that carry their own Hessian-vector product.

A *loss of output* is a callable ``(output, batch) -> scalar`` (the mean loss of the
batch given the model's output). The GGN ``G = J^T H_loss J`` needs ``H_loss u`` for
directions ``u`` in output space; a :class:`LossOfOutput` supplies it in closed form
(``.hvp``), so no double backward through the loss is ever taken.

Users attach an analytical HVP to their own loss with :func:`loss_of_output`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["LOSS_FN", "LOSS_OF_OUTPUT", "LossOfOutput", "factory_of", "loss_of_output"]

HvpFn = Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor]
WeightFn = Callable[[Any], "int | torch.Tensor"]
F = TypeVar("F", bound=Callable[..., Any])

LOSS_FN = "loss function (model, batch) -> loss"
LOSS_OF_OUTPUT = "loss of output (output, batch) -> loss"


def factory_of(what: str) -> Callable[[F], F]:
    """Mark a factory of ``what`` (:data:`LOSS_FN`, :data:`LOSS_OF_OUTPUT`).

    Operators refuse the factory itself where its product belongs, saying to call it
    (``GGNOperator(..., cross_entropy_loss_of_output)`` instead of ``...()``).
    """

    def mark(factory: F) -> F:
        factory._factory_of = what  # type: ignore[attr-defined]
        return factory

    return mark


class LossOfOutput:
    """A loss ``(output, batch) -> scalar`` with an optional closed-form ``.hvp``.

    Args:
        fn: ``(output, batch) -> scalar`` mean loss of the batch.
        hvp: ``(output, batch, u) -> H_loss u`` where ``H_loss`` is the Hessian of
            ``fn(output, batch)`` with respect to ``output`` (same shape as ``output``).
            ``None`` if not available (then only ``loss_hvp="autograd"`` works).
        batch_weight: ``batch -> weight`` of the batch in the dataset mean (samples, or
            non-ignored tokens for token losses). ``None``: the batch size.
        name: Name for messages.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor, Any], torch.Tensor],
        hvp: HvpFn | None = None,
        *,
        batch_weight: WeightFn | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable (output, batch) -> loss, got {fn!r}.")
        if hvp is not None and not callable(hvp):
            raise TypeError(f"hvp must be callable (output, batch, u) -> H u, got {hvp!r}.")
        self._fn = fn
        self._hvp = hvp
        if batch_weight is not None:
            self.batch_weight = batch_weight
        self.name = name or getattr(fn, "__name__", type(self).__name__)

    @property
    def has_hvp(self) -> bool:
        """Whether a closed-form Hessian-vector product is available."""
        return self._hvp is not None

    def __call__(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        return self._fn(output, batch)

    def hvp(self, output: torch.Tensor, batch: Any, u: torch.Tensor) -> torch.Tensor:
        """``H_loss u`` for the loss Hessian with respect to the output.

        Raises:
            TypeError: This loss has no closed form; build the GGN with
                ``loss_hvp="autograd"``.
        """
        if self._hvp is None:
            raise TypeError(
                f"Loss {self.name!r} has no analytical .hvp. Use GGNOperator(..., "
                "loss_hvp='autograd'), or attach one with loss_of_output(fn, hvp=...)."
            )
        return self._hvp(output, batch, u)

    def __repr__(self) -> str:
        return f"LossOfOutput({self.name}, analytical_hvp={self.has_hvp})"


def loss_of_output(
    fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    *,
    hvp: HvpFn | None = None,
    batch_weight: WeightFn | None = None,
    name: str | None = None,
) -> Any:
    """Attach a closed-form Hessian-vector product to a loss of the output.

    Usable directly or as a decorator::

        def my_hvp(output, batch, u):
            return 2 * u / output.numel()  # Hessian of mean((output - y)**2)

        @loss_of_output(hvp=my_hvp)
        def my_loss(output, batch):
            return ((output - batch[1]) ** 2).mean()

    Args:
        fn: ``(output, batch) -> scalar`` mean loss.
        hvp: ``(output, batch, u) -> H_loss u``.
        batch_weight: ``batch -> weight`` in the dataset mean (default: batch size).
        name: Name for messages.

    Returns:
        A :class:`LossOfOutput` (or a decorator producing one).
    """
    if fn is None:
        return lambda f: LossOfOutput(f, hvp, batch_weight=batch_weight, name=name)
    return LossOfOutput(fn, hvp, batch_weight=batch_weight, name=name)

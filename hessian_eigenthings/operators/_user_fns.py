"""Checks of the functions users hand to operators: loss, forward and loss-of-output functions.

A wrong function is caught where it is passed or where its first value comes back, with
a message naming the argument, what it must be, and the fix. A factory passed uncalled
(``hf_lm_loss`` instead of ``hf_lm_loss()``) is recognised by the ``_factory_of``
attribute the library's factories carry (see
:func:`~hessian_eigenthings.loss_fns.base.factory_of`) and refused at construction
with the call to write.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_callable", "check_scalar_loss", "check_tensor_output"]


def check_callable(fn: Any, role: str, signature: str) -> None:
    """Raise unless ``fn`` is a callable of the given ``signature`` (not a factory of one).

    Args:
        fn: The user's function.
        role: The argument's name (``"loss_fn"``).
        signature: What it maps, for the message (``"(model, batch) -> loss"``).
    """
    made = getattr(fn, "_factory_of", None)
    if isinstance(made, str):
        name = getattr(fn, "__name__", repr(fn))
        raise TypeError(
            f"{role} got {name}, which makes a {made} instead of being one; call it: "
            f"{role}={name}(...)."
        )
    if not callable(fn):
        raise TypeError(f"{role} must be callable {signature}, got {fn!r}.")


def check_tensor_output(out: Any, what: str) -> torch.Tensor:
    """``out`` if it is a floating tensor, else the error saying what ``what`` returned."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{what} must return a tensor, got {type(out).__name__}. For models returning "
            "an output object, return the tensor itself (e.g. model(**batch).logits)."
        )
    if not out.is_floating_point():
        raise TypeError(f"{what} must return a floating tensor, got dtype {out.dtype}.")
    return out


def check_scalar_loss(loss: Any, role: str) -> torch.Tensor:
    """``loss`` if it is a 0-d tensor (the batch's mean loss), else a clear error."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"{role} must return a scalar tensor (the mean loss of the batch), got {got}."
        )
    return loss

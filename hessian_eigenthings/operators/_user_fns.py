"""Checks of the functions users hand to operators: loss, forward and loss-of-output functions.

A wrong function is caught where it is passed or where its first value comes back, with
a message naming the argument, what it must be, and the fix. A factory passed uncalled
(``hf_lm_loss`` instead of ``hf_lm_loss()``) is recognised by the ``_factory_of``
attribute the library's factories carry (see
:func:`~hessian_eigenthings.loss_fns.base.factory_of`) and refused at construction
with the call to write. A value without an autograd graph (a detached loss) is refused
by :func:`check_graph`, and an exception raised while a batch is processed is re-raised
with the batch named (:func:`located`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "check_callable",
    "check_graph",
    "check_scalar_loss",
    "check_tensor_output",
    "located",
]


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


def check_graph(
    value: torch.Tensor,
    role: str,
    what: str,
    given: str = "every parameter of the model required grad while it ran",
) -> None:
    """Raise unless ``value``, computed from inputs that required grad, has a graph.

    Args:
        value: The tensor the operator differentiates (a loss, an output).
        role: The function that returned it (``"loss_fn"``).
        what: What it is, for the message (``"a loss"``).
        given: What required grad while it ran, for the message.
    """
    if value.requires_grad:
        return
    where = (
        " (it is an inference tensor: computed under torch.inference_mode())"
        if value.is_inference()
        else ""
    )
    raise ValueError(
        f"{role} returned {what} without an autograd graph (requires_grad=False){where}, "
        f"although {given}: every curvature product would be exactly zero (or fail). Usual "
        "causes: .detach(), torch.no_grad() "
        f"or torch.inference_mode() inside {role}, or .item() / float() wrapped back into a "
        "tensor (torch.tensor(loss.item())). Return the tensor computed from the model."
    )


def _with_location(err: Exception, note: str) -> Exception | None:
    """``err`` as a new exception of its type with ``note`` appended (``None``: cannot)."""
    message = f"{err}\n({note})"
    try:
        new = type(err)(message)
    except Exception:  # a constructor with other arguments: keep the original
        return None
    if new.args != (message,):
        return None
    new.__dict__.update(err.__dict__)
    return new


@contextmanager
def located(where: Callable[[], str | None], who: str) -> Iterator[None]:
    """Re-raise exceptions of the body with the place ``where()`` names added.

    The new exception has the type of the original and the original as its
    ``__cause__``; where the type cannot be rebuilt from a message, the original is
    re-raised with a note (Python >= 3.11). Exceptions that already name their batch
    (``NonFiniteError``) pass unchanged.

    Args:
        where: What the operator is doing (``"processing batch index 3 (loader
            order)"``), ``None`` if nothing that names a place.
        who: The operator, for the message.
    """
    try:
        yield
    except Exception as err:
        place = where()
        if place is None or getattr(err, "batch_index", None) is not None or place in str(err):
            raise
        note = f"raised in {who} while {place}"
        new = _with_location(err, note)
        if new is None:
            if hasattr(err, "add_note"):
                err.add_note(note)
            raise
        raise new from err

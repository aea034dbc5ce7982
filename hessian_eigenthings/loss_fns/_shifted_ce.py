r"""Next-token (causally shifted) cross entropy of language-model logits, with ``.hvp``.

For logits :math:`z \in \mathbb{R}^{B \times T \times V}` and per-position targets
:math:`y_{b,t}` that already hold the *next* token (position :math:`t` predicts token
:math:`t+1`; the last position and padding hold ``-100``), the loss of the batch is

.. math::

    L(z) = \frac{1}{n} \sum_{(b,t):\, y_{b,t} \ne -100} \big(\operatorname{logsumexp}
    (z_{b,t}) - z_{b,t,y_{b,t}}\big), \qquad n = \#\{(b,t): y_{b,t} \ne -100\},

with :math:`n` an exact int64 count (never rounded in the logits' dtype). The value is
computed in float32 for float16/bfloat16 logits (as HuggingFace does) and in the
logits' dtype otherwise (float64 stays float64). ``.hvp`` is the closed form
:math:`(H u)_{b,t} = [y_{b,t} \ne -100]\,(p \odot u - p \langle p, u \rangle) / n`
computed by :func:`~hessian_eigenthings.loss_fns.fused_ce.fused_ce_hvp` directly on the
unshifted ``(B, T, V)`` logits (no shifted copy), and ``.batch_weight`` is :math:`n`, so
data operators weight batches by their non-ignored token counts and the operator is
the curvature of the token mean over the whole dataset. ``.head_ce`` declares it a
cross entropy of the LM head's logits (operators chunk the head, see
:mod:`~hessian_eigenthings.loss_fns.head_ce`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from hessian_eigenthings.loss_fns.base import LossOfOutput
from hessian_eigenthings.loss_fns.fused_ce.dispatch import BACKENDS, fused_ce_hvp
from hessian_eigenthings.loss_fns.head_ce import HeadCrossEntropy

__all__ = ["IGNORE_INDEX", "next_token_targets", "per_sequence_ce", "shifted_ce_loss_of_output"]

IGNORE_INDEX = -100
"""Target value of positions that do not count (HuggingFace's convention)."""


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``labels[..., 1:]`` padded with ``-100`` at the end: position ``t`` predicts ``t+1``.

    Args:
        labels: ``(B, T)`` integer labels aligned with the inputs (``-100`` = ignore).

    Returns:
        ``(B, T)`` targets aligned with the logits; the last position is ignored.
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got dtype {labels.dtype}.")
    if labels.dim() < 1:
        raise ValueError("labels must have a sequence dimension, got a 0-d tensor.")
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def _check_logits(logits: torch.Tensor, targets: torch.Tensor, name: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != targets.dim() + 1:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"{name}: expected logits of shape {(*targets.shape, 'V')} for labels of shape "
            f"{tuple(targets.shape)}, got {got}."
        )
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"{name}: logits {tuple(logits.shape)} do not match labels {tuple(targets.shape)} "
            "in the leading (batch, sequence) dimensions."
        )


def shifted_ce_loss_of_output(
    targets_of: Callable[[Any], torch.Tensor], *, fused: str, name: str
) -> LossOfOutput:
    """Build the shifted-CE :class:`LossOfOutput` for a way of reading targets from a batch.

    Args:
        targets_of: ``batch -> (B, T)`` next-token targets aligned with the logits
            (``-100`` where a position does not count).
        fused: Backend of ``.hvp``: ``"auto"``, ``"eager"``, ``"compile"`` or ``"triton"``
            (an explicit backend that cannot run on the logits' device raises when
            ``.hvp`` is called).
        name: Name for messages.

    Returns:
        The loss of output with ``.hvp`` and ``.batch_weight``.
    """
    choices = ("auto", *BACKENDS)
    if fused not in choices:
        raise ValueError(f"Unknown fused={fused!r}; expected one of {choices}.")

    def fn(logits: torch.Tensor, batch: Any) -> torch.Tensor:
        targets = targets_of(batch).to(logits.device)
        _check_logits(logits, targets, name)
        acc = torch.promote_types(logits.dtype, torch.float32)
        n = (targets != IGNORE_INDEX).sum()
        total = F.cross_entropy(
            logits.to(acc).flatten(0, -2),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total / n.clamp_min(1).to(acc)

    def hvp(logits: torch.Tensor, batch: Any, u: torch.Tensor) -> torch.Tensor:
        targets = targets_of(batch).to(logits.device)
        _check_logits(logits, targets, name)
        return fused_ce_hvp(logits, targets, u, ignore_index=IGNORE_INDEX, backend=fused)

    def batch_weight(batch: Any) -> torch.Tensor:
        return (targets_of(batch) != IGNORE_INDEX).sum()

    loss = LossOfOutput(fn, hvp, batch_weight=batch_weight, name=name)
    loss.head_ce = HeadCrossEntropy(targets=targets_of, fused=fused)  # type: ignore[attr-defined]
    return loss


def per_sequence_ce(logits: torch.Tensor, targets: torch.Tensor, name: str) -> torch.Tensor:
    """``(B,)``: each sequence's mean cross entropy over its counted targets (0 if none).

    Computed in float32 for float16/bfloat16 logits, in the logits' dtype otherwise.
    """
    _check_logits(logits, targets, name)
    acc = torch.promote_types(logits.dtype, torch.float32)
    per_token = F.cross_entropy(
        logits.to(acc).flatten(0, -2),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).reshape(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(-1).clamp_min(1).to(acc)
    return per_token.sum(-1) / counts

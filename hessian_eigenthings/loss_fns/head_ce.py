r"""What a language-model loss declares so that operators can chunk the LM head.

A causal language model ends in a linear head :math:`z = h W^\top (+ b)` whose
``(tokens, V)`` logits dominate the memory of a curvature product at large vocabularies
(GPT-2: ``V = 50257``). The library's LM losses say what they compute with a
:class:`HeadCrossEntropy` in their ``head_ce`` attribute: the token cross entropy of the
model's output-embedding logits, against targets read from the batch. Curvature
operators then evaluate the model up to the head's input and apply the head and the loss
chunk by chunk over tokens (:mod:`~hessian_eigenthings.loss_fns.fused_ce.linear`,
:mod:`~hessian_eigenthings.loss_fns.fused_ce.linear_hvp`), so the logits and their
tangents never exist whole (see
:mod:`~hessian_eigenthings.operators._lm_head`). A loss without the attribute is used
as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["HeadCrossEntropy", "head_ce_of"]


@dataclass(frozen=True)
class HeadCrossEntropy:
    """The declaration: this loss is the cross entropy of the LM head's logits.

    Attributes:
        targets: ``batch -> (B, T)`` integer targets aligned with the logits (position
            ``t`` holds the token it predicts), ``ignore_index`` where nothing counts.
        logits: ``(model, batch) -> (B, T, V)`` logits the loss is of, for a loss of the
            model (``loss_fn(model, batch)``); ``None`` for a loss of the output, whose
            logits are the operator's ``forward_fn``.
        per_sample: ``False``: the mean over all counted tokens of the batch (a scalar).
            ``True``: one loss per sequence, the mean over its counted tokens (``(B,)``,
            ``0`` for a sequence with none), for the empirical Fisher.
        ignore_index: Target value of tokens that do not count.
        fused: Cross-entropy HVP backend of the loss (``"auto"``, ``"eager"``, ...).
    """

    targets: Callable[[Any], torch.Tensor]
    logits: Callable[[nn.Module, Any], torch.Tensor] | None = None
    per_sample: bool = False
    ignore_index: int = -100
    fused: str = "auto"


def head_ce_of(loss: Any) -> HeadCrossEntropy | None:
    """The loss's :class:`HeadCrossEntropy` declaration, or ``None``."""
    declared = getattr(loss, "head_ce", None)
    return declared if isinstance(declared, HeadCrossEntropy) else None

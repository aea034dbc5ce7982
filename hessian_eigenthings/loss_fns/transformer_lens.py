r"""Losses and forward functions for TransformerLens ``HookedTransformer`` models.

Batches are either a ``(B, T)`` tensor of token ids, or a mapping with ``"tokens"``
(or ``"input_ids"``) and optionally ``"attention_mask"`` (``1`` = real token, ``0`` =
padding). As in TransformerLens' ``lm_cross_entropy_loss``, position ``t`` predicts token
``t+1`` and a prediction counts when both positions are unmasked; the loss of a batch is
the mean over the counted predictions, and data operators weight batches by that count
(``batch_weight``), so the operator is the curvature of the token mean over the whole
dataset.

* :func:`tlens_loss`: ``loss_fn(model, batch)`` = ``model(tokens, return_type="loss")``
  (TransformerLens' own loss).
* :func:`tlens_forward`: the forward function ``(model, batch) -> (B, T, V)`` logits,
  passed as it is.
* :func:`tlens_loss_of_output`: the same loss as a function of the logits, with a
  closed-form ``.hvp`` (fused cross-entropy HVP) for the GGN.
* :func:`tlens_per_sample_loss`: one mean next-token loss per sequence, for the
  empirical Fisher.

All of them declare ``head_ce`` (:mod:`~hessian_eigenthings.loss_fns.head_ce`), so
curvature operators chunk the ``unembed`` head over tokens.

Parameters keep TransformerLens' names (``embed.W_E``, ``blocks.0.attn.W_Q``,
``unembed.W_U``, ...), so ``param_filter=["blocks.*.attn.*"]`` selects attention weights.
``HookedTransformer`` computes attention with explicit einsums (no fused SDPA kernel), so
every derivative is exact without special handling. Requires the ``transformer-lens``
extra (``transformer-lens>=2,<4``; 4.x removed ``HookedTransformer``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any, overload

import torch
from torch import nn

from hessian_eigenthings._deprecation import factory_call
from hessian_eigenthings.loss_fns._shifted_ce import (
    IGNORE_INDEX,
    per_sequence_ce,
    shifted_ce_loss_of_output,
)
from hessian_eigenthings.loss_fns.base import LOSS_FN, LOSS_OF_OUTPUT, LossOfOutput, factory_of
from hessian_eigenthings.loss_fns.head_ce import HeadCrossEntropy

__all__ = [
    "tlens_forward",
    "tlens_loss",
    "tlens_loss_of_output",
    "tlens_per_sample_loss",
    "tlens_token_count",
]


def _require_transformer_lens() -> None:
    if importlib.util.find_spec("transformer_lens") is None:
        raise ImportError(
            "hessian_eigenthings.loss_fns.transformer_lens needs TransformerLens; install it "
            "with `pip install hessian-eigenthings[transformer-lens]` (transformer-lens>=2,<4)."
        )


def _tokens_and_mask(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        tokens, mask = batch, None
    elif isinstance(batch, Mapping):
        tokens = batch.get("tokens", batch.get("input_ids"))
        mask = batch.get("attention_mask")
    else:
        raise TypeError(
            "TransformerLens batches must be a (batch, pos) token tensor or a mapping with "
            f"'tokens' (and optionally 'attention_mask'), got {type(batch).__name__}."
        )
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"Expected tokens of shape (batch, pos), got {got}.")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask must have the tokens' shape {tuple(tokens.shape)}, got "
            f"{tuple(mask.shape)}."
        )
    return tokens, mask


def _targets(batch: Any) -> torch.Tensor:
    """``(B, T)`` next-token targets: ``tokens[:, t+1]`` where counted, else ``-100``."""
    tokens, mask = _tokens_and_mask(batch)
    nxt = tokens[:, 1:]
    if mask is not None:
        counted = mask[:, :-1].bool() & mask[:, 1:].bool()
        nxt = torch.where(counted, nxt, torch.full_like(nxt, IGNORE_INDEX))
    return torch.nn.functional.pad(nxt, (0, 1), value=IGNORE_INDEX)


def tlens_token_count(batch: Any) -> torch.Tensor | int:
    """Number of counted next-token predictions of ``batch``.

    ``B * (T - 1)`` without an attention mask (an int), else the number of positions
    where both the token and the next one are unmasked (int64 0-d tensor, no host sync).
    """
    tokens, mask = _tokens_and_mask(batch)
    if mask is None:
        return int(tokens.shape[0] * (tokens.shape[1] - 1))
    return (mask[:, :-1].bool() & mask[:, 1:].bool()).sum()


@overload
def tlens_forward() -> Callable[[nn.Module, Any], torch.Tensor]: ...
@overload
def tlens_forward(model: nn.Module, batch: Any) -> torch.Tensor: ...
def tlens_forward(model: nn.Module | None = None, batch: Any = None) -> Any:
    """The forward function of a ``HookedTransformer``: its ``(B, T, V)`` logits.

    ``model(tokens, return_type="logits", attention_mask=mask)``. Pass the function
    itself as ``forward_fn``; the older factory call ``tlens_forward()`` still returns
    it, with a ``DeprecationWarning``.

    Args:
        model: The ``HookedTransformer``.
        batch: A ``(B, T)`` token tensor or a mapping with ``tokens``.

    Returns:
        The logits.
    """
    if model is None:
        return factory_call(tlens_forward)
    _require_transformer_lens()
    tokens, mask = _tokens_and_mask(batch)
    kwargs = {} if mask is None else {"attention_mask": mask}
    return model(tokens, return_type="logits", **kwargs)


@factory_of(LOSS_FN)
def tlens_loss() -> Callable[[nn.Module, Any], torch.Tensor]:
    """``loss_fn(model, batch)``: TransformerLens' own next-token loss of the batch.

    ``model(tokens, return_type="loss", attention_mask=mask)``: the mean cross entropy
    of the counted next-token predictions, in the model's dtype.

    Returns:
        The loss function, carrying ``batch_weight`` = :func:`tlens_token_count`.
    """
    _require_transformer_lens()

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        tokens, mask = _tokens_and_mask(batch)
        kwargs = {} if mask is None else {"attention_mask": mask}
        return model(tokens, return_type="loss", **kwargs)

    loss.batch_weight = tlens_token_count  # type: ignore[attr-defined]
    loss.head_ce = HeadCrossEntropy(targets=_targets, logits=tlens_forward)  # type: ignore[attr-defined]
    return loss


@factory_of(LOSS_FN)
def tlens_per_sample_loss() -> Callable[[nn.Module, Any], torch.Tensor]:
    r"""``loss_fn(model, batch) -> (B,)``: each sequence's mean next-token loss.

    For :class:`~hessian_eigenthings.EmpiricalFisherOperator`: sequence :math:`i`
    contributes the mean cross entropy of its counted next-token predictions (``0`` if
    it has none), from the logits of :func:`tlens_forward`, in float32 at least.

    Returns:
        The per-sample loss function (declares ``head_ce``).
    """
    _require_transformer_lens()

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        return per_sequence_ce(
            tlens_forward(model, batch), _targets(batch), "tlens_per_sample_loss"
        )

    loss.head_ce = HeadCrossEntropy(  # type: ignore[attr-defined]
        targets=_targets, logits=tlens_forward, per_sample=True
    )
    return loss


@factory_of(LOSS_OF_OUTPUT)
def tlens_loss_of_output(fused: str = "auto") -> LossOfOutput:
    r"""TransformerLens' next-token loss as a function of the logits, with ``.hvp``.

    ``loss(logits, batch)`` equals ``model(tokens, return_type="loss")`` for
    ``logits = model(tokens)``; ``.hvp(logits, batch, u)`` is the closed form
    :math:`(H u)_{b,t} = [\text{counted}]\,(p \odot u - p \langle p, u \rangle) / n` on
    the unshifted logits, by the fused kernel ``fused`` (see
    :func:`~hessian_eigenthings.loss_fns.fused_ce.fused_ce_hvp`).

    Args:
        fused: ``"auto"``, ``"eager"``, ``"compile"`` or ``"triton"``.

    Returns:
        A :class:`~hessian_eigenthings.loss_fns.base.LossOfOutput` with ``.batch_weight``.
    """
    _require_transformer_lens()
    return shifted_ce_loss_of_output(_targets, fused=fused, name="tlens_loss_of_output")

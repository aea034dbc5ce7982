r"""Losses and forward functions for HuggingFace causal language models.

Batches are mappings as a tokenizer / data collator produces them (``dict`` or
``BatchEncoding``): ``input_ids``, optionally ``attention_mask``, and ``labels``
aligned with the inputs, ``-100`` at positions that must not count (padding). As in
HuggingFace's ``ForCausalLMLoss``, position ``t`` predicts label ``t+1``, and the loss
of a batch is the mean over its non-ignored shifted labels.

Across batches every data operator weights a batch by its number of non-ignored
shifted labels (``batch_weight``), so the operator is the curvature of the **token
mean over the whole dataset**,

.. math::

    L(\theta) = \frac{1}{\sum_b n_b} \sum_b \sum_{(i,t) \in b,\, y_{i,t+1} \ne -100}
    \ell_{i,t}(\theta),

not the mean of per-batch means.

* :func:`hf_lm_loss`: ``loss_fn(model, batch)`` for
  :class:`~hessian_eigenthings.HessianOperator` (HuggingFace's own ``model(**batch).loss``
  by default).
* :func:`hf_lm_forward`: the forward function ``(model, batch) -> logits`` for the GGN,
  passed as it is (labels are not passed to the model, so no loss is computed in the
  forward).
* :func:`hf_lm_loss_of_output`: the loss of the logits with a closed-form ``.hvp``
  (fused cross-entropy HVP) for the GGN. Formerly ``hf_lm_shifted_ce``, which still works
  with a ``DeprecationWarning``.
* :func:`hf_lm_per_sample_loss`: one mean next-token loss per sequence, for the
  empirical Fisher.

All of them declare ``head_ce`` (:mod:`~hessian_eigenthings.loss_fns.head_ce`): on a
model whose logits come straight from its output embedding
(``model.get_output_embeddings()``), curvature operators chunk the head and the loss
over tokens, so the ``(tokens, V)`` logits never exist whole.

Example::

    GGNOperator(model, batches, hf_lm_forward, hf_lm_loss_of_output())

Attention. Models use HuggingFace's default attention implementation (``"sdpa"``,
i.e. ``torch.nn.functional.scaled_dot_product_attention``; ``"eager"`` also works).
Curvature operators run their double-backward and forward-mode passes inside
:func:`~hessian_eigenthings.operators._autodiff_safety.curvature_mode`, which selects
PyTorch's math SDPA backend (the flash / memory-efficient kernels have no double
backward and no forward-mode AD) and restores the user's choice afterwards; first-order
passes keep the user's kernels. FlashAttention
implementations (``"flash_attention_2"``, ...) bypass SDPA and are rejected with the
remedy; other custom implementations are used as they are, with a logged warning.

Precision. Some HuggingFace modules compute in float32 whatever the model dtype
(``ForCausalLMLoss`` upcasts the logits with ``.float()``; ``LlamaRMSNorm`` normalises in
float32). A float64 model with such a module is only float32-accurate there; the
curvature is exact for the function the model computes, but that function carries
float32 rounding. Use :func:`hf_lm_loss` with ``from_logits=True`` to keep the loss in
float64; GPT-2 and GPT-NeoX are float64 throughout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, overload

import torch
from torch import nn

from hessian_eigenthings._deprecation import factory_call, renamed_function
from hessian_eigenthings.loss_fns._shifted_ce import (
    IGNORE_INDEX,
    next_token_targets,
    per_sequence_ce,
    shifted_ce_loss_of_output,
)
from hessian_eigenthings.loss_fns.base import LOSS_FN, LOSS_OF_OUTPUT, LossOfOutput, factory_of
from hessian_eigenthings.loss_fns.head_ce import HeadCrossEntropy

__all__ = [
    "hf_lm_forward",
    "hf_lm_loss",
    "hf_lm_loss_of_output",
    "hf_lm_per_sample_loss",
    "hf_lm_shifted_ce",
    "hf_token_count",
]

logger = logging.getLogger("hessian_eigenthings")

_DIFFERENTIABLE_ATTENTION = ("sdpa", "eager")
_LOGGED: set[str] = set()


def _log_once(key: str, level: int, msg: str, *args: Any) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.log(level, msg, *args)


def _check_batch(batch: Any) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            "HuggingFace LM batches must be mappings (dict / BatchEncoding) with 'input_ids' "
            f"and 'labels', got {type(batch).__name__}."
        )
    return batch


def _labels(batch: Any) -> torch.Tensor:
    labels = _check_batch(batch).get("labels")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            "The batch has no 'labels' tensor. Add labels aligned with the inputs, e.g. "
            "batch['labels'] = batch['input_ids'] with -100 at padding positions."
        )
    return labels


def hf_token_count(batch: Any) -> torch.Tensor:
    """Number of non-ignored shifted labels of ``batch`` (int64 0-d tensor, no host sync).

    This is the count HuggingFace's loss averages over: ``labels[..., 1:] != -100``.
    """
    return (_labels(batch)[..., 1:] != IGNORE_INDEX).sum()


def _output_field(out: Any, key: str, owner: str, needs: str) -> torch.Tensor:
    """``out.<key>`` (or ``out[key]``) of a HuggingFace model output, checked."""
    value = getattr(out, key, None)
    if value is None and isinstance(out, Mapping):
        value = out.get(key)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"model(**batch) returned {type(out).__name__} without a {key!r} tensor; "
            f"{owner} expects a HuggingFace *ForCausalLM model{needs}."
        )
    return value


def _check_attention(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl is None or impl in _DIFFERENTIABLE_ATTENTION:
        _log_once(
            f"attn:{impl}",
            logging.INFO,
            "hessian_eigenthings: HuggingFace attention implementation %r; curvature "
            "operators run its double-backward and forward-mode passes with the math "
            "scaled_dot_product_attention backend.",
            impl,
        )
        return
    if "flash" in str(impl):
        raise ValueError(
            f"The model uses attention implementation {impl!r}, whose kernels have no double "
            "backward and no forward-mode AD, so its Hessian / GGN products cannot be exact. "
            "Switch to 'sdpa' (e.g. model.set_attn_implementation('sdpa'), or "
            "from_config(..., attn_implementation='sdpa'))."
        )
    _log_once(
        f"attn:{impl}",
        logging.WARNING,
        "hessian_eigenthings: HuggingFace attention implementation %r is not 'sdpa' or "
        "'eager'; its second-order / forward-mode derivatives are used as they are. If a "
        "curvature product fails or looks wrong, switch to 'sdpa'.",
        impl,
    )


@overload
def hf_lm_forward() -> Callable[[nn.Module, Any], torch.Tensor]: ...
@overload
def hf_lm_forward(model: nn.Module, batch: Any) -> torch.Tensor: ...
def hf_lm_forward(model: nn.Module | None = None, batch: Any = None) -> Any:
    """The forward function of a causal LM: ``(B, T, V)`` logits, without the labels.

    Every key of the batch except ``labels`` is passed to ``model(**inputs)``, so no loss
    is computed in the forward. Pass the function itself as ``forward_fn`` of
    :class:`~hessian_eigenthings.GGNOperator`; the older factory call
    ``hf_lm_forward()`` still returns it, with a ``DeprecationWarning``.

    Args:
        model: A HuggingFace ``*ForCausalLM`` model.
        batch: A mapping with ``input_ids`` (and ``attention_mask``, ``labels``, ...).

    Returns:
        The logits.
    """
    if model is None:
        return factory_call(hf_lm_forward)
    inputs = {k: v for k, v in _check_batch(batch).items() if k != "labels"}
    _check_attention(model)
    return _output_field(model(**inputs), "logits", "hf_lm_forward", "")


@factory_of(LOSS_OF_OUTPUT)
def hf_lm_loss_of_output(fused: str = "auto") -> LossOfOutput:
    r"""Shifted next-token cross entropy of the logits, with closed-form ``.hvp``.

    ``loss(logits, batch)`` is HuggingFace's causal-LM loss computed from the logits:
    position ``t`` predicts ``labels[t+1]``, mean over the non-ignored (``!= -100``)
    shifted labels, the count kept as an exact integer. ``.hvp(logits, batch, u)`` is

    .. math::

        (H u)_{b,t} = \frac{[y_{b,t+1} \ne -100]}{n} \big(p \odot u - p \langle p, u
        \rangle\big), \qquad p = \operatorname{softmax}(z_{b,t}),

    zero at the last position, computed in place on the unshifted logits by the fused
    kernel ``fused`` (see :func:`~hessian_eigenthings.loss_fns.fused_ce.fused_ce_hvp`).
    ``.batch_weight(batch)`` is ``n`` (:func:`hf_token_count`).

    Args:
        fused: ``"auto"`` (Triton on CUDA, else ``torch.compile``, else eager; logged),
            ``"eager"``, ``"compile"`` or ``"triton"`` (an explicit choice that cannot run
            raises).

    Returns:
        A :class:`~hessian_eigenthings.loss_fns.base.LossOfOutput`.

    Example:
        >>> loss = hf_lm_loss_of_output(fused="eager")
        >>> logits = torch.randn(2, 4, 7)
        >>> batch = {"labels": torch.tensor([[1, 2, 3, -100], [4, 5, 6, 0]])}
        >>> loss.batch_weight(batch)
        tensor(5)
    """
    return shifted_ce_loss_of_output(
        lambda batch: next_token_targets(_labels(batch)), fused=fused, name="hf_lm_loss_of_output"
    )


hf_lm_shifted_ce = renamed_function(hf_lm_loss_of_output, "hf_lm_shifted_ce")


@factory_of(LOSS_FN)
def hf_lm_loss(*, from_logits: bool = False) -> Callable[[nn.Module, Any], torch.Tensor]:
    """``loss_fn(model, batch)``: the mean next-token loss of a causal LM on the batch.

    Args:
        from_logits: ``False`` (default): HuggingFace's own ``model(**batch).loss`` (the
            loss the model trains with). HuggingFace computes it in float32 whatever the
            model dtype (``ForCausalLMLoss`` upcasts the logits with ``.float()``), so a
            float64 model gets a float32-accurate loss. ``True``: the same shifted cross
            entropy computed by :func:`hf_lm_loss_of_output` from the logits of
            :func:`hf_lm_forward`, in the logits' dtype (float64 stays float64); use it to
            verify curvature in float64.

    Returns:
        The loss function, carrying ``batch_weight`` = :func:`hf_token_count`, so data
        operators weight batches by their non-ignored token counts.
    """
    if not isinstance(from_logits, bool):
        raise TypeError(f"from_logits must be a bool, got {from_logits!r}.")
    head_ce = HeadCrossEntropy(targets=_next_token_targets, logits=hf_lm_forward)
    if from_logits:
        ce = hf_lm_loss_of_output(fused="eager")

        def loss_from_logits(model: nn.Module, batch: Any) -> torch.Tensor:
            return ce(hf_lm_forward(model, batch), batch)

        loss_from_logits.batch_weight = hf_token_count  # type: ignore[attr-defined]
        loss_from_logits.head_ce = head_ce  # type: ignore[attr-defined]
        return loss_from_logits

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        _labels(batch)
        _check_attention(model)
        out = model(**batch)
        value = _output_field(out, "loss", "hf_lm_loss", " and a batch with labels")
        if value.dtype != getattr(out, "logits", value).dtype:
            _log_once(
                "hf-loss-dtype",
                logging.INFO,
                "hessian_eigenthings: HuggingFace computes the LM loss in %s while the logits "
                "are %s; use hf_lm_loss(from_logits=True) for a loss in the logits' dtype.",
                value.dtype,
                getattr(out, "logits", value).dtype,
            )
        return value

    loss.batch_weight = hf_token_count  # type: ignore[attr-defined]
    loss.head_ce = head_ce  # type: ignore[attr-defined]
    return loss


def _next_token_targets(batch: Any) -> torch.Tensor:
    return next_token_targets(_labels(batch))


@factory_of(LOSS_FN)
def hf_lm_per_sample_loss() -> Callable[[nn.Module, Any], torch.Tensor]:
    r"""``loss_fn(model, batch) -> (B,)``: each sequence's mean next-token loss.

    For :class:`~hessian_eigenthings.EmpiricalFisherOperator` on a causal LM, with one
    sample per sequence: sequence :math:`i` contributes
    :math:`\ell_i = rac{1}{n_i} \sum_t \mathrm{CE}(z_{i,t}, y_{i,t+1})` over its
    :math:`n_i` non-ignored shifted labels (``0`` if it has none), computed from the logits
    of :func:`hf_lm_forward` in float32 at least. Batches are weighted by their number
    of sequences (the operator's default).

    Returns:
        The per-sample loss function (declares ``head_ce``, so the operator can chunk the
        LM head).
    """

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        return per_sequence_ce(
            hf_lm_forward(model, batch), _next_token_targets(batch), "hf_lm_per_sample_loss"
        )

    loss.head_ce = HeadCrossEntropy(  # type: ignore[attr-defined]
        targets=_next_token_targets, logits=hf_lm_forward, per_sample=True
    )
    return loss

r"""Losses and forward functions for HuggingFace encoder-decoder (seq2seq) language models.

T5, BART, mBART, Pegasus, Marian, Whisper-style models: the encoder reads the inputs,
the decoder reads the *shifted* labels (``decoder_input_ids``, which the model builds
from ``labels`` by prepending its decoder start token) and its logits at position ``t``
predict ``labels[t]``. So, unlike a causal LM, **labels are not shifted** against the
logits: the loss of a batch is the mean cross entropy over its non-ignored labels
(``-100`` marks padding), as HuggingFace's ``model(**batch).loss`` computes it.

Batches are mappings (``dict`` / ``BatchEncoding``, as ``DataCollatorForSeq2Seq`` makes
them): ``input_ids`` (or ``input_features`` for speech encoders), optionally
``attention_mask``, ``labels`` and ``decoder_input_ids``. Without ``decoder_input_ids``
the forward builds them with the model's own ``prepare_decoder_input_ids_from_labels``
(the shift HuggingFace applies when it is given labels, with ``-100`` replaced by the pad
token), so the logits are exactly those of ``model(**batch)``.

Across batches, data operators weight a batch by its number of non-ignored labels
(:func:`hf_seq2seq_token_count`), so the operator is the curvature of the **token mean
over the whole dataset**,

.. math::

    L(\theta) = \frac{1}{\sum_b n_b} \sum_b \sum_{(i,t) \in b,\, y_{i,t} \ne -100}
    \big(\operatorname{logsumexp}(z_{i,t}) - z_{i,t,y_{i,t}}\big),
    \qquad n_b = \#\{(i,t) \in b: y_{i,t} \ne -100\}.

* :func:`hf_seq2seq_loss`: ``loss_fn(model, batch)`` for the Hessian.
* :func:`hf_seq2seq_forward` and :func:`hf_seq2seq_loss_of_output`: the forward (logits,
  labels not passed to the model) and the loss of the logits with the closed-form
  ``.hvp`` :math:`(H u)_{i,t} = [y_{i,t} \ne -100] (p \odot u - p \langle p, u \rangle)
  / n` (fused cross-entropy HVP), for the GGN.
* :func:`hf_seq2seq_token_losses`: the per-token losses of the non-ignored labels, for
  the empirical Fisher over tokens, ``F = (1/N) \sum_{\text{tokens}} g_t g_t^\top``.

Attention: HuggingFace's default (``"sdpa"``) works; curvature operators run it with the
math SDPA backend (see :mod:`hessian_eigenthings.loss_fns.huggingface`), and FlashAttention
implementations are rejected with the remedy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hessian_eigenthings.loss_fns._shifted_ce import IGNORE_INDEX, shifted_ce_loss_of_output
from hessian_eigenthings.loss_fns.base import LossOfOutput
from hessian_eigenthings.loss_fns.huggingface import _check_attention, _check_batch, _labels

__all__ = [
    "hf_seq2seq_forward",
    "hf_seq2seq_loss",
    "hf_seq2seq_loss_of_output",
    "hf_seq2seq_token_count",
    "hf_seq2seq_token_losses",
]

_DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")


def hf_seq2seq_token_count(batch: Any) -> torch.Tensor:
    """Number of non-ignored labels of ``batch`` (int64 0-d tensor, no host sync).

    This is the count HuggingFace's seq2seq loss averages over: ``labels != -100``
    (no shift: the decoder input is the shifted labels).
    """
    return (_labels(batch) != IGNORE_INDEX).sum()


def _model_inputs(model: nn.Module, batch: Any) -> dict[str, Any]:
    """The batch without ``labels``, with ``decoder_input_ids`` built from them if absent."""
    inputs = {k: v for k, v in _check_batch(batch).items() if k != "labels"}
    if not any(k in inputs for k in _DECODER_INPUTS):
        labels = _labels(batch)
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if not callable(prepare):
            raise TypeError(
                f"{type(model).__name__} has no prepare_decoder_input_ids_from_labels, so the "
                "decoder inputs cannot be built from the labels. Put 'decoder_input_ids' (the "
                "labels shifted right, starting with the decoder start token) in the batch, or "
                "use a HuggingFace *ForConditionalGeneration model."
            )
        inputs["decoder_input_ids"] = prepare(labels=labels)
    return inputs


def _logits_of(out: Any, model: nn.Module) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"model(**batch) returned {type(out).__name__} without a 'logits' tensor; "
            f"{type(model).__name__} is not a HuggingFace encoder-decoder LM "
            "(*ForConditionalGeneration)."
        )
    return logits


def hf_seq2seq_forward() -> Callable[[nn.Module, Any], torch.Tensor]:
    """``forward_fn(model, batch) -> logits`` of an encoder-decoder LM, without the labels.

    Every key of the batch except ``labels`` is passed to ``model(**inputs)``; without
    ``decoder_input_ids`` they are built from the labels by
    ``model.prepare_decoder_input_ids_from_labels``. Returns the ``(B, T, V)`` decoder
    logits (no loss is computed in the forward).

    Returns:
        The forward function (for :class:`~hessian_eigenthings.GGNOperator` and
        :class:`~hessian_eigenthings.MCFisherOperator`).
    """

    def forward(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs = _model_inputs(model, batch)
        _check_attention(model)
        return _logits_of(model(**inputs), model)

    return forward


def hf_seq2seq_loss_of_output(fused: str = "auto") -> LossOfOutput:
    r"""Cross entropy of the decoder logits against the (unshifted) labels, with ``.hvp``.

    ``loss(logits, batch)``: mean over the non-ignored labels of
    ``logsumexp(z_{i,t}) - z_{i,t,y_{i,t}}``, the count kept as an exact integer (float32
    accumulation for float16/bfloat16 logits, the logits' dtype otherwise).
    ``.hvp(logits, batch, u)`` is the closed form
    :math:`(H u)_{i,t} = [y_{i,t} \ne -100] (p \odot u - p \langle p, u \rangle) / n`,
    computed by the fused kernel ``fused`` (see
    :func:`~hessian_eigenthings.loss_fns.fused_ce.fused_ce_hvp`); ``.batch_weight`` is
    :func:`hf_seq2seq_token_count`.

    Args:
        fused: ``"auto"``, ``"eager"``, ``"compile"`` or ``"triton"`` (an explicit choice
            that cannot run raises).

    Returns:
        A :class:`~hessian_eigenthings.loss_fns.base.LossOfOutput`.

    Example:
        >>> loss = hf_seq2seq_loss_of_output(fused="eager")
        >>> batch = {"labels": torch.tensor([[4, 5, -100], [6, 7, 8]])}
        >>> loss.batch_weight(batch)
        tensor(5)
    """
    return shifted_ce_loss_of_output(_labels, fused=fused, name="hf_seq2seq_loss")


def hf_seq2seq_loss(*, from_logits: bool = False) -> Callable[[nn.Module, Any], torch.Tensor]:
    """``loss_fn(model, batch)``: the mean token loss of an encoder-decoder LM on the batch.

    Args:
        from_logits: ``False`` (default): HuggingFace's own ``model(**batch).loss`` (the
            loss the model trains with; T5 and BART compute it in the logits' dtype).
            ``True``: the same cross entropy computed by :func:`hf_seq2seq_loss_of_output`
            from the logits of :func:`hf_seq2seq_forward`, in the logits' dtype (a batch
            whose labels are all ``-100`` then has loss 0 instead of HuggingFace's NaN).

    Returns:
        The loss function, carrying ``batch_weight`` = :func:`hf_seq2seq_token_count`,
        so data operators weight batches by their numbers of non-ignored labels.
    """
    if not isinstance(from_logits, bool):
        raise TypeError(f"from_logits must be a bool, got {from_logits!r}.")
    if from_logits:
        forward = hf_seq2seq_forward()
        ce = hf_seq2seq_loss_of_output(fused="eager")

        def loss_from_logits(model: nn.Module, batch: Any) -> torch.Tensor:
            return ce(forward(model, batch), batch)

        loss_from_logits.batch_weight = hf_seq2seq_token_count  # type: ignore[attr-defined]
        return loss_from_logits

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        _labels(batch)
        _check_attention(model)
        out = model(**batch)
        value = getattr(out, "loss", None)
        if value is None and isinstance(out, Mapping):
            value = out.get("loss")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"model(**batch) returned {type(out).__name__} without a 'loss' tensor; "
                "hf_seq2seq_loss expects a HuggingFace encoder-decoder LM "
                "(*ForConditionalGeneration) and a batch with labels."
            )
        return value

    loss.batch_weight = hf_seq2seq_token_count  # type: ignore[attr-defined]
    return loss


def hf_seq2seq_token_losses() -> Callable[[nn.Module, Any], torch.Tensor]:
    r"""``loss_fn(model, batch) -> (n,)``: the loss of every non-ignored label of the batch.

    For :class:`~hessian_eigenthings.EmpiricalFisherOperator` over tokens: with the
    losses :math:`\ell_t` of the ``n`` non-ignored labels (row-major order) the operator is
    :math:`F = \frac{1}{N} \sum_t \nabla \ell_t \nabla \ell_t^\top` over the ``N`` tokens of
    the dataset. The function carries ``batch_weight`` = :func:`hf_seq2seq_token_count`,
    which the operator uses as the batch's number of samples.

    Returns:
        The per-token loss function (in the logits' dtype; float32 for half precision).
    """
    forward = hf_seq2seq_forward()

    def token_losses(model: nn.Module, batch: Any) -> torch.Tensor:
        logits = forward(model, batch)
        labels = _labels(batch).to(logits.device)
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"hf_seq2seq_token_losses: logits {tuple(logits.shape)} do not match labels "
                f"{tuple(labels.shape)} in the (batch, sequence) dimensions."
            )
        keep = labels != IGNORE_INDEX
        acc = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(logits[keep].to(acc), labels[keep], reduction="none")

    token_losses.batch_weight = hf_seq2seq_token_count  # type: ignore[attr-defined]
    return token_losses

"""HuggingFace encoder-decoder LMs (T5, BART): losses, token weights, Hessian, GGN, Fisher.

Oracles: HuggingFace's own ``model(**batch)`` (loss and logits), 4-point finite
differences of exact first-order float64 gradients of the token mean over the whole
dataset (tests.helpers.fd_hvp with token-count weights), ``torch.autograd.functional.hvp``
of that mean, the GGN with the loss Hessian by autograd against the closed form, and the
dense per-token empirical Fisher ``(1/N) G^T G`` from ``torch.func.jacrev``.

Tiny models are built from configs (no hub). HuggingFace's default attention (``"sdpa"``)
is used throughout.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

transformers = pytest.importorskip("transformers")
modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")

from hessian_eigenthings import (  # noqa: E402
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
)
from hessian_eigenthings.loss_fns.huggingface_seq2seq import (  # noqa: E402
    hf_seq2seq_forward,
    hf_seq2seq_loss,
    hf_seq2seq_loss_of_output,
    hf_seq2seq_token_count,
    hf_seq2seq_token_losses,
)
from tests.helpers import (  # noqa: E402
    assert_unchanged,
    fd_hvp,
    mean_loss_fn,
    param_dict,
    rel_err,
    snapshot,
)

VOCAB = 13


def _t5(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=8,
        d_kv=4,
        d_ff=12,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        relative_attention_num_buckets=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(cfg).to(dtype).eval()


def _bart(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=8,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=12,
        decoder_ffn_dim=12,
        max_position_embeddings=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return transformers.BartForConditionalGeneration(cfg).to(dtype).eval()


def _float64_t5_norm(self, hidden_states):
    """T5LayerNorm in the hidden states' dtype (HuggingFace's computes the variance in
    float32 even in a float64 model, which caps finite differences at ~1e-4)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture
def t5_float64_norm(monkeypatch):
    monkeypatch.setattr(modeling_t5.T5LayerNorm, "forward", _float64_t5_norm)
    return _t5


MODELS = {"t5": "t5_float64_norm", "bart": None}


def _make(name, request):
    return request.getfixturevalue(MODELS[name]) if MODELS[name] else _bart


def _batch(rows, src, tgt, pads, seed):
    """Source ids with a padded last position, labels with -100 on the right padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, src), generator=gen)
    mask = torch.ones(rows, src, dtype=torch.long)
    labels = torch.randint(3, VOCAB, (rows, tgt), generator=gen)
    for i, p in enumerate(pads):
        if p:
            labels[i, -p:] = -100
            mask[i, -1] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# 6 and 11 non-ignored labels: different numbers of ignored labels per batch
BATCHES = [_batch(2, 5, 4, [0, 2], 1), _batch(3, 4, 5, [1, 3, 0], 2)]


def _names(model):
    return [n for n, _ in model.named_parameters()]


def _tokens(b):
    return int(hf_seq2seq_token_count(b))


def _vec(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- losses and weights
def test_token_count_is_unshifted_non_ignored_count():
    assert [_tokens(b) for b in BATCHES] == [4 + 2, 4 + 2 + 5]
    assert hf_seq2seq_token_count(BATCHES[0]).dtype == torch.int64
    assert hf_seq2seq_loss().batch_weight is hf_seq2seq_token_count
    assert hf_seq2seq_loss(from_logits=True).batch_weight is hf_seq2seq_token_count
    assert int(hf_seq2seq_loss_of_output().batch_weight(BATCHES[1])) == 11
    assert hf_seq2seq_token_losses().batch_weight is hf_seq2seq_token_count


@pytest.mark.parametrize("make", [_t5, _bart], ids=["t5", "bart"])
def test_forward_and_losses_equal_huggingface(make):
    model = make()
    assert model.config._attn_implementation == "sdpa"  # HF's default
    forward = hf_seq2seq_forward()
    ce = hf_seq2seq_loss_of_output(fused="eager")
    for b in BATCHES:
        out = model(**b)  # HF shifts the labels into decoder_input_ids itself
        logits = forward(model, b)
        assert torch.equal(logits, out.logits)
        assert rel_err(ce(logits, b).detach(), out.loss.detach()) < 1e-13
        assert torch.equal(hf_seq2seq_loss()(model, b), out.loss)
        exact = hf_seq2seq_loss(from_logits=True)(model, b).detach()
        assert rel_err(exact, out.loss.detach()) < 1e-13
        per_token = hf_seq2seq_token_losses()(model, b)
        assert per_token.shape == (_tokens(b),)
        assert rel_err(per_token.mean().detach(), out.loss.detach()) < 1e-13


def test_explicit_decoder_inputs_are_used_and_missing_builder_raises():
    model = _bart()
    b = dict(BATCHES[0])
    b["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=b["labels"])
    forward = hf_seq2seq_forward()
    assert torch.equal(forward(model, b), forward(model, BATCHES[0]))
    b["decoder_input_ids"] = torch.roll(b["decoder_input_ids"], 1, dims=1)
    assert not torch.equal(forward(model, b), forward(model, BATCHES[0]))

    class NoBuilder(nn.Module):
        def forward(self, **kw):
            return None

    with pytest.raises(TypeError, match="decoder_input_ids"):
        forward(NoBuilder(), BATCHES[0])


def test_loss_of_output_hvp_equals_autograd():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    u = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    labels[0, 2:] = -100
    labels[1, 1] = -100
    batch = {"labels": labels}
    ce = hf_seq2seq_loss_of_output(fused="eager")
    want_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert rel_err(ce(logits, batch), want_loss) < 1e-14
    _, want = torch.autograd.functional.hvp(lambda z: ce(z, batch), logits, u)
    got = ce.hvp(logits, batch, u)
    assert rel_err(got, want) < 1e-12
    assert torch.all(got[labels == -100] == 0)
    assert torch.any(got[:, -1] != 0)  # unlike a causal LM, the last position counts


def test_all_ignored_batch_and_bad_batches():
    ce = hf_seq2seq_loss_of_output(fused="eager")
    batch = {"labels": torch.full((2, 4), -100)}
    logits = torch.randn(2, 4, 5)
    assert ce(logits, batch) == 0
    assert torch.equal(ce.hvp(logits, batch, torch.randn(2, 4, 5)), torch.zeros(2, 4, 5))
    assert int(ce.batch_weight(batch)) == 0
    model = _bart()
    with pytest.raises(TypeError, match="mappings"):
        hf_seq2seq_forward()(model, (torch.zeros(1, 3, dtype=torch.long),))
    with pytest.raises(ValueError, match="no 'labels'"):
        hf_seq2seq_loss()(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="do not match labels"):
        ce(torch.randn(2, 3, 5), {"labels": torch.zeros(2, 4).long()})


def test_flash_attention_is_rejected():
    class Stub(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(_attn_implementation="flash_attention_2")

        def prepare_decoder_input_ids_from_labels(self, labels):
            return labels.clamp_min(0)

    with pytest.raises(ValueError, match="sdpa"):
        hf_seq2seq_forward()(Stub(), BATCHES[0])


# ---------------------------------------------------------------- Hessian
@pytest.mark.parametrize("from_logits", [True, False], ids=["from_logits", "hf_own_loss"])
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_hessian_matches_fd_of_dataset_token_mean(name, from_logits, request):
    model = _make(name, request)()
    snap = snapshot(model)
    loss = hf_seq2seq_loss(from_logits=from_logits)
    H = HessianOperator(model, BATCHES, loss)
    v = _vec(H.size, 5)
    got = H @ v
    names = _names(model)
    want = fd_hvp(model, BATCHES, loss, v, names=names, weight=_tokens)
    assert rel_err(got, want) <= 1e-7
    # the test discriminates: the plain mean of batch means is a different matrix
    unweighted = fd_hvp(model, BATCHES, loss, v, names=names, weight=lambda b: 1)
    assert rel_err(unweighted, want) > 1e-3
    assert_unchanged(model, snap)


def test_hessian_of_huggingface_t5_as_is_equals_exact_hvp():
    """HF's T5LayerNorm rounds its variance to float32 (in a float64 model), so the model
    computes a float32-accurate function; the operator agrees with the double backward of
    the token-weighted dataset mean up to that rounding (measured 4e-8; the per-batch and
    the summed evaluation round differently). The oracle needs the math SDPA backend: HF's
    default CPU attention kernel has no double backward."""
    model = _t5()
    names = _names(model)
    H = HessianOperator(model, BATCHES, hf_seq2seq_loss())
    v = _vec(H.size, 6)
    f = mean_loss_fn(model, BATCHES, hf_seq2seq_loss(), names, _tokens)
    flat = torch.cat([param_dict(model, names)[n].reshape(-1) for n in names])
    with sdpa_kernel(SDPBackend.MATH):
        _, want = torch.autograd.functional.hvp(f, flat, v)
    assert rel_err(H @ v, want) <= 1e-6


@pytest.mark.parametrize("make", [_t5, _bart], ids=["t5", "bart"])
def test_hessian_float32_with_huggingface_own_loss(make):
    v = _vec(sum(p.numel() for p in make().parameters()), 7)
    ref = HessianOperator(make(), BATCHES, hf_seq2seq_loss(from_logits=True)) @ v
    own32 = HessianOperator(make(torch.float32), BATCHES, hf_seq2seq_loss()) @ v.float()
    assert rel_err(own32, ref) <= 1e-6


def test_all_ignored_batch_and_microbatches_do_not_change_the_operator():
    model = _bart()
    loss = hf_seq2seq_loss(from_logits=True)
    v = _vec(sum(p.numel() for p in model.parameters()), 8)
    base = HessianOperator(model, BATCHES, loss) @ v
    empty = _batch(2, 4, 3, [0, 0], 9)
    empty["labels"] = torch.full_like(empty["labels"], -100)
    with_empty = HessianOperator(model, [*BATCHES, empty], loss) @ v
    assert rel_err(with_empty, base) < 1e-12
    split = HessianOperator(model, BATCHES, loss, microbatch_size=1) @ v
    assert rel_err(split, base) < 1e-12
    hf_own = HessianOperator(model, [*BATCHES, empty], hf_seq2seq_loss()) @ v  # HF: 0/0 = NaN
    assert rel_err(hf_own, base) < 1e-12


# ---------------------------------------------------------------- GGN and empirical Fisher
def _ggn(model, loss_hvp, **kw):
    return GGNOperator(
        model,
        BATCHES,
        hf_seq2seq_forward(),
        hf_seq2seq_loss_of_output(fused="eager"),
        loss_hvp=loss_hvp,
        **kw,
    )


# T5 with a float64 norm: forward- and reverse-mode AD round HF's float32 variance differently
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_ggn_analytical_equals_autograd(name, request):
    model = _make(name, request)()
    snap = snapshot(model)
    G = _ggn(model, "analytical")
    v = _vec(G.size, 2)
    got = G @ v
    assert rel_err(got, _ggn(model, "autograd") @ v) <= 1e-9
    assert float(v @ got) >= 0  # PSD
    assert rel_err(_ggn(model, "analytical", microbatch_size=1) @ v, got) <= 1e-12
    assert_unchanged(model, snap)


def _dense_token_fisher(model, batches):
    """(1/N) G^T G with G the (N, n) matrix of per-token loss gradients (jacrev)."""
    names = _names(model)
    params = param_dict(model, names)
    rows = []
    with sdpa_kernel(SDPBackend.MATH):
        for b in batches:

            def token_losses(ps, b=b):
                out = torch.func.functional_call(model, ps, (), dict(b))
                logits, labels = out.logits, b["labels"]
                keep = labels != -100
                return F.cross_entropy(logits[keep], labels[keep], reduction="none")

            jac = torch.func.jacrev(token_losses)(params)
            rows.append(torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], 1))
    G = torch.cat(rows)
    return G.T @ G / G.shape[0]


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_empirical_fisher_over_tokens_equals_dense_oracle(name, request):
    model = _make(name, request)()
    snap = snapshot(model)
    Fop = EmpiricalFisherOperator(model, BATCHES, hf_seq2seq_token_losses())
    dense = _dense_token_fisher(model, BATCHES)
    V = torch.stack([_vec(Fop.size, 3), _vec(Fop.size, 4)], dim=1)
    assert rel_err(Fop @ V[:, 0], dense @ V[:, 0]) <= 1e-10
    assert rel_err(Fop.matmat(V), dense @ V) <= 1e-10
    split = EmpiricalFisherOperator(model, BATCHES, hf_seq2seq_token_losses(), microbatch_size=1)
    assert rel_err(split @ V[:, 0], dense @ V[:, 0]) <= 1e-10
    assert_unchanged(model, snap)

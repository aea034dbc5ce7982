"""HuggingFace causal LMs: losses, token weighting, attention backend, Hessian and GGN.

Oracles: 4-point finite differences of exact first-order gradients of the token mean
over the whole dataset (tests.helpers.fd_hvp with token-count weights), autograd
Hessian-vector products of the loss of output, and the GGN with the loss Hessian by
autograd (``loss_hvp="autograd"``) against the closed form.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from hessian_eigenthings import GGNOperator, HessianOperator  # noqa: E402
from hessian_eigenthings.loss_fns.huggingface import (  # noqa: E402
    hf_lm_forward,
    hf_lm_loss,
    hf_lm_loss_of_output,
    hf_token_count,
)
from tests.helpers import assert_unchanged, fd_hvp, rel_err, snapshot  # noqa: E402

VOCAB = 13


def _gpt2(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=VOCAB,
        n_positions=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()


def _neox(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()


def _batch(rows, length, pads, seed):
    """input_ids, attention_mask and labels with -100 on the right padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=gen)
    mask = torch.ones(rows, length, dtype=torch.long)
    labels = ids.clone()
    for i, p in enumerate(pads):
        if p:
            mask[i, -p:] = 0
            labels[i, -p:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


BATCHES = [_batch(2, 6, [0, 2], 1), _batch(3, 5, [2, 4, 0], 2)]  # 8 and 6 counted tokens


def _names(model):
    return [n for n, _ in model.named_parameters()]


def _token_weight(b):
    return int(hf_token_count(b))


# ---------------------------------------------------------------- losses and weights
def test_token_count_is_exact_shifted_count():
    assert [int(hf_token_count(b)) for b in BATCHES] == [5 + 3, 2 + 0 + 4]
    assert hf_token_count(BATCHES[0]).dtype == torch.int64
    assert hf_lm_loss().batch_weight is hf_token_count
    assert int(hf_lm_loss_of_output().batch_weight(BATCHES[1])) == 6


def test_old_names_and_calling_styles_work_with_a_deprecation_warning():
    """hf_lm_shifted_ce is hf_lm_loss_of_output's old name; hf_lm_forward is the forward
    function itself, and its old factory call hf_lm_forward() returns it."""
    from hessian_eigenthings.loss_fns.huggingface import hf_lm_shifted_ce

    logits = torch.randn(3, 5, VOCAB, dtype=torch.float64)  # BATCHES[1] is (3, 5)
    with pytest.warns(DeprecationWarning, match="hf_lm_shifted_ce.*use hf_lm_loss_of_output"):
        old = hf_lm_shifted_ce(fused="eager")
    new = hf_lm_loss_of_output(fused="eager")
    b = BATCHES[1]
    assert torch.equal(old(logits, b), new(logits, b))
    assert torch.equal(old.hvp(logits, b, logits), new.hvp(logits, b, logits))
    with pytest.warns(
        DeprecationWarning, match=r"hf_lm_forward\(\) is deprecated.*without calling"
    ):
        forward = hf_lm_forward()
    assert forward is hf_lm_forward
    model = _gpt2()
    inputs = {k: v for k, v in b.items() if k != "labels"}
    assert torch.equal(forward(model, b), model(**inputs).logits)


def test_factories_passed_uncalled_are_refused_with_the_call_to_write():
    model = _gpt2()
    with pytest.raises(TypeError, match=r"loss_of_output_fn=hf_lm_loss_of_output\(\.\.\.\)"):
        GGNOperator(model, BATCHES, hf_lm_forward, hf_lm_loss_of_output)
    with pytest.raises(TypeError, match=r"loss_fn got hf_lm_loss, which makes a loss function"):
        HessianOperator(model, BATCHES, hf_lm_loss)


def test_losses_equal_huggingface_loss():
    model = _gpt2(torch.float32)
    assert model.config._attn_implementation == "sdpa"  # HF's default
    ce = hf_lm_loss_of_output(fused="eager")
    for b in BATCHES:
        want = model(**b).loss
        assert torch.equal(hf_lm_loss()(model, b), want)
        assert rel_err(ce(hf_lm_forward(model, b), b).detach(), want.detach()) < 1e-6
    model64 = _gpt2(torch.float64)
    for b in BATCHES:
        exact = hf_lm_loss(from_logits=True)(model64, b)
        assert exact.dtype == torch.float64
        assert rel_err(exact.detach(), model64(**b).loss.detach()) < 1e-6  # HF: float32


def test_loss_of_output_hvp_equals_autograd():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    u = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    labels[0, 2:] = -100
    labels[1, 1] = -100
    batch = {"labels": labels}
    ce = hf_lm_loss_of_output(fused="eager")
    _, want = torch.autograd.functional.hvp(lambda z: ce(z, batch), logits, u)
    got = ce.hvp(logits, batch, u)
    assert rel_err(got, want) < 1e-12
    assert torch.all(got[:, -1] == 0)  # the last position predicts nothing


def test_all_ignored_batch_loss_is_zero_not_nan():
    ce = hf_lm_loss_of_output(fused="eager")
    batch = {"labels": torch.full((2, 4), -100)}
    logits = torch.randn(2, 4, 5)
    assert ce(logits, batch) == 0
    assert torch.equal(ce.hvp(logits, batch, torch.randn(2, 4, 5)), torch.zeros(2, 4, 5))
    assert int(ce.batch_weight(batch)) == 0


def test_bad_batches_raise():
    model = _gpt2(torch.float32)
    with pytest.raises(TypeError, match="mappings"):
        hf_lm_forward(model, (torch.zeros(1, 3, dtype=torch.long),))
    with pytest.raises(ValueError, match="no 'labels'"):
        hf_lm_loss()(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="Unknown fused"):
        hf_lm_loss_of_output(fused="cuda")
    with pytest.raises(ValueError, match="do not match labels"):
        hf_lm_loss_of_output(fused="eager")(
            torch.randn(2, 3, 5), {"labels": torch.zeros(2, 4).long()}
        )


def test_flash_attention_implementation_is_rejected():
    class Stub(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(_attn_implementation="flash_attention_2")

    with pytest.raises(ValueError, match="sdpa"):
        hf_lm_forward(Stub(), BATCHES[0])


# ---------------------------------------------------------------- Hessian
def test_hessian_gpt2_matches_fd_of_dataset_token_mean():
    model = _gpt2()
    snap = snapshot(model)
    loss = hf_lm_loss(from_logits=True)
    H = HessianOperator(model, BATCHES, loss)
    v = torch.randn(H.size, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = H @ v
    names = _names(model)
    want = fd_hvp(model, BATCHES, loss, v, names=names, weight=_token_weight)
    assert rel_err(got, want) <= 1e-7
    # the test discriminates: the plain mean of batch means is a different matrix
    unweighted = fd_hvp(model, BATCHES, loss, v, names=names, weight=lambda b: 1)
    assert rel_err(unweighted, want) > 1e-3
    assert_unchanged(model, snap)


def test_hessian_with_huggingface_own_loss_float32():
    model = _gpt2(torch.float32)
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    own = HessianOperator(model, BATCHES, hf_lm_loss()) @ v
    ours = HessianOperator(model, BATCHES, hf_lm_loss(from_logits=True)) @ v
    assert rel_err(own, ours) <= 1e-5


def test_all_ignored_batch_and_microbatches_do_not_change_the_operator():
    model = _gpt2()
    loss = hf_lm_loss(from_logits=True)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    base = HessianOperator(model, BATCHES, loss) @ v
    empty = _batch(2, 5, [0, 0], 9)
    empty["labels"] = torch.full_like(empty["labels"], -100)
    with_empty = HessianOperator(model, [*BATCHES, empty], loss) @ v
    assert torch.isfinite(with_empty).all()
    assert rel_err(with_empty, base) < 1e-12
    split = HessianOperator(model, BATCHES, loss, microbatch_size=1) @ v
    assert rel_err(split, base) < 1e-12
    hf_own = HessianOperator(model, [*BATCHES, empty], hf_lm_loss()) @ v  # HF loss: 0/0 = NaN
    assert torch.isfinite(hf_own).all()


def test_curvature_runs_hf_sdpa_with_math_backend_and_restores(monkeypatch):
    model = _gpt2()
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(
            (
                torch.backends.cuda.flash_sdp_enabled(),
                torch.backends.cuda.mem_efficient_sdp_enabled(),
                torch.backends.cuda.math_sdp_enabled(),
            )
        )
        return original(*args, **kwargs)

    before = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    H = HessianOperator(model, BATCHES[:1], hf_lm_loss(), check_determinism=False)
    seen.clear()  # the construction probe is first order: it keeps the user's kernels
    H @ torch.randn(H.size, dtype=torch.float64)
    assert seen and all(s == (False, False, True) for s in seen)
    after = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    assert after == before


# HF's LlamaRMSNorm computes in float32 even in a float64 model (hidden.to(float32)), so
# the float64 Llama loss is only float32-accurate: its finite differences are limited by
# rounding (measured: 3e-6 at h=1e-2, 2.5e-5 at h=1e-3), and the bound is float32-level.
@pytest.mark.parametrize(
    ("make", "h", "bound"), [(_llama, 1e-2, 1e-5), (_neox, 1e-3, 1e-7)], ids=["llama", "gpt_neox"]
)
def test_other_architectures_hessian_matches_fd(make, h, bound):
    model = make()
    assert model.config._attn_implementation == "sdpa"
    loss = hf_lm_loss(from_logits=True)
    H = HessianOperator(model, BATCHES, loss)
    v = torch.randn(H.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = fd_hvp(model, BATCHES, loss, v, names=_names(model), weight=_token_weight, h=h)
    assert rel_err(H @ v, want) <= bound


# ---------------------------------------------------------------- GGN
def _ggn(model, loss_hvp, fused="eager", **kw):
    return GGNOperator(
        model, BATCHES, hf_lm_forward, hf_lm_loss_of_output(fused=fused), loss_hvp=loss_hvp, **kw
    )


@pytest.mark.parametrize("make", [_gpt2, _llama, _neox], ids=["gpt2", "llama", "gpt_neox"])
def test_ggn_analytical_equals_autograd(make):
    model = make()
    snap = snapshot(model)
    G = _ggn(model, "analytical")
    v = torch.randn(G.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = G @ v
    want = _ggn(model, "autograd") @ v
    assert rel_err(got, want) <= 1e-9
    assert float(v @ got) >= 0  # PSD
    assert_unchanged(model, snap)


def test_ggn_auto_backend_float32():
    model = _gpt2(torch.float32)
    G = _ggn(model, "analytical", fused="auto")
    v = torch.randn(G.size, generator=torch.Generator().manual_seed(3))
    assert rel_err(G @ v, _ggn(model, "autograd") @ v) <= 1e-5

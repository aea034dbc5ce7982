"""TransformerLens HookedTransformer: losses, token weighting, Hessian and GGN.

Oracles: TransformerLens' own loss (value), 4-point finite differences of exact
gradients of the token mean over the whole dataset (Hessian), and the GGN with the
loss Hessian by autograd (closed form check).
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformer_lens = pytest.importorskip("transformer_lens")

from hessian_eigenthings import GGNOperator, HessianOperator  # noqa: E402
from hessian_eigenthings.loss_fns.transformer_lens import (  # noqa: E402
    tlens_forward,
    tlens_loss,
    tlens_loss_of_output,
    tlens_token_count,
)
from tests.helpers import assert_unchanged, fd_hvp, rel_err, snapshot  # noqa: E402

VOCAB = 11


def _model(attn_only=True, seed=0):
    cfg = transformer_lens.HookedTransformerConfig(
        n_layers=1,
        d_model=8,
        n_ctx=8,
        d_head=4,
        n_heads=2,
        d_vocab=VOCAB,
        d_mlp=None if attn_only else 16,
        act_fn=None if attn_only else "gelu",
        attn_only=attn_only,
        normalization_type="LN",
        dtype=torch.float64,
        device="cpu",
        seed=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.x deprecates HookedTransformer
        model = transformer_lens.HookedTransformer(cfg)
    return model.eval()


GEN = torch.Generator().manual_seed(0)
BATCHES = [
    torch.randint(0, VOCAB, (3, 6), generator=GEN),  # 15 predictions
    {
        "tokens": torch.randint(0, VOCAB, (2, 5), generator=GEN),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),  # 3 + 1
    },
]


def _weight(b):
    return int(tlens_token_count(b))


def test_parameter_names_and_token_counts():
    names = [n for n, _ in _model().named_parameters()]
    assert "blocks.0.attn.W_Q" in names and "unembed.W_U" in names
    assert [_weight(b) for b in BATCHES] == [15, 4]
    assert tlens_loss().batch_weight is tlens_token_count
    assert int(tlens_loss_of_output().batch_weight(BATCHES[1])) == 4


def test_loss_of_output_equals_transformer_lens_loss():
    model = _model()
    ce = tlens_loss_of_output(fused="eager")
    for b in BATCHES:
        own = tlens_loss()(model, b)
        assert own.dtype == torch.float64
        assert rel_err(ce(tlens_forward(model, b), b).detach(), own.detach()) < 1e-14


def test_loss_of_output_hvp_equals_autograd():
    model = _model()
    ce = tlens_loss_of_output(fused="eager")
    b = BATCHES[1]
    logits = tlens_forward(model, b).detach()
    u = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=logits.dtype)
    _, want = torch.autograd.functional.hvp(lambda z: ce(z, b), logits, u)
    assert rel_err(ce.hvp(logits, b, u), want) < 1e-12


@pytest.mark.parametrize("attn_only", [True, False], ids=["attn_only", "with_mlp"])
def test_hessian_matches_fd_of_dataset_token_mean(attn_only):
    model = _model(attn_only)
    snap = snapshot(model)
    H = HessianOperator(model, BATCHES, tlens_loss())
    v = torch.randn(H.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    want = fd_hvp(model, BATCHES, tlens_loss(), v, names=names, weight=_weight)
    assert rel_err(H @ v, want) <= 1e-7
    assert_unchanged(model, snap)


def test_attention_only_param_filter():
    model = _model()
    H = HessianOperator(model, BATCHES, tlens_loss(), param_filter=["blocks.*.attn.W_*"])
    names = [n for n, _ in H.named_params]
    assert names and all(".attn.W_" in n for n in names)
    v = torch.randn(H.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = fd_hvp(model, BATCHES, tlens_loss(), v, names=names, weight=_weight)
    assert rel_err(H @ v, want) <= 1e-7


def test_ggn_analytical_equals_autograd():
    model = _model(attn_only=False)

    def ggn(loss_hvp):
        return GGNOperator(
            model, BATCHES, tlens_forward, tlens_loss_of_output(fused="eager"), loss_hvp=loss_hvp
        )

    G = ggn("analytical")
    v = torch.randn(G.size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = G @ v
    assert rel_err(got, ggn("autograd") @ v) <= 1e-9
    assert float(v @ got) >= 0


def test_bad_batches_raise():
    model = _model()
    with pytest.raises(TypeError, match="token tensor or a mapping"):
        tlens_loss()(model, [1, 2, 3])
    with pytest.raises(ValueError, match=r"\(batch, pos\)"):
        tlens_loss()(model, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        tlens_loss()(model, {"tokens": torch.zeros(2, 3).long(), "attention_mask": torch.ones(2)})


def test_missing_transformer_lens_raises_import_error_naming_the_extra(monkeypatch):
    import hessian_eigenthings.loss_fns.transformer_lens as mod

    monkeypatch.setattr(mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"hessian-eigenthings\[transformer-lens\]"):
        tlens_loss()

"""TransformerLens 3's ``TransformerBridge`` around a locally built HuggingFace model.

``TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...)`` wraps a model
already in memory without any hub call (the name is only a label); the tokenizer here is
a word-level one built offline. The bridge is called like a ``HookedTransformer``
(``model(tokens, return_type="loss" | "logits")``), so ``tlens_loss`` / ``tlens_forward`` /
``tlens_loss_of_output`` apply unchanged.

Oracles: 4-point finite differences of exact gradients of the bridge's token mean over
the dataset; the GGN with the loss Hessian by autograd; and an unwrapped twin of the
HuggingFace model (same config and seed), whose Hessian has the same nonzero spectrum:
the bridge splits GPT-2's fused ``c_attn`` into ``q``, ``k``, ``v`` (a permutation of the
same numbers) and keeps an unused fused ``qkv`` copy, whose rows are zero.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformer_lens = pytest.importorskip("transformer_lens")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
bridge_module = pytest.importorskip("transformer_lens.model_bridge")

from hessian_eigenthings import GGNOperator, HessianOperator, lanczos, match_names  # noqa: E402
from hessian_eigenthings.loss_fns.huggingface import hf_lm_loss  # noqa: E402
from hessian_eigenthings.loss_fns.transformer_lens import (  # noqa: E402
    tlens_forward,
    tlens_loss,
    tlens_loss_of_output,
    tlens_token_count,
)
from tests.helpers import assert_unchanged, rel_err, snapshot  # noqa: E402

VOCAB = 13


def _hf_gpt2():
    torch.manual_seed(0)
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
    return transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()


def _tokenizer():
    """A word-level tokenizer built offline (no BOS token: TransformerLens would otherwise
    reload it from the hub with add_bos_token=True)."""
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t1")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="t0", unk_token="t1", pad_token="t2"
    )


def _bridge():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bridge_module.TransformerBridge.boot_transformers(
            "gpt2", hf_model=_hf_gpt2(), tokenizer=_tokenizer(), dtype=torch.float64
        )


GEN = torch.Generator().manual_seed(3)
BATCHES = [  # 15 and 8 next-token predictions
    torch.randint(0, VOCAB, (3, 6), generator=GEN),
    torch.randint(0, VOCAB, (2, 5), generator=GEN),
]


def _weight(b):
    return int(tlens_token_count(b))


def _fd_hvp_in_place(model, batches, loss_fn, v, weight, names, h=1e-3):
    """4-point finite difference of exact gradients of the weighted mean loss along v.

    The parameters ``names`` are shifted in place and restored exactly (the bridge does
    not survive ``torch.func.functional_call``, which tests.helpers.fd_hvp uses); they must
    not overlap in memory.
    """
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    base = [p.detach().clone() for p in params]
    u = v / v.norm()
    pieces = torch.split(u, [p.numel() for p in params])
    total = sum(weight(b) for b in batches)

    def grad_at(s):
        with torch.no_grad():
            for p, b0, d in zip(params, base, pieces):
                p.copy_(b0 + s * h * d.view_as(p))
        loss = sum(weight(b) * loss_fn(model, b) for b in batches) / total
        g = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat(
            [(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(g, params)]
        )

    try:
        fd = (-grad_at(2) + 8 * grad_at(1) - 8 * grad_at(-1) + grad_at(-2)) / (12 * h)
    finally:
        with torch.no_grad():
            for p, b0 in zip(params, base):
                p.copy_(b0)
    return fd * v.norm()


def _vec(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_bridge_computes_the_huggingface_model_and_its_loss():
    bridge, twin = _bridge(), _hf_gpt2()
    assert isinstance(bridge, bridge_module.TransformerBridge)
    for tokens in BATCHES:
        logits = tlens_forward()(bridge, tokens)
        assert rel_err(logits.detach(), twin(tokens).logits.detach()) < 1e-13  # eager vs sdpa
        ours = tlens_loss_of_output(fused="eager")(logits, tokens)
        assert rel_err(tlens_loss()(bridge, tokens).detach(), ours.detach()) < 1e-14
        # HF's loss is float32 (ForCausalLMLoss upcasts); the bridge's is float64
        assert rel_err(ours.detach(), twin(tokens, labels=tokens).loss.detach()) < 1e-6


def test_hessian_of_bridge_matches_fd_and_unused_fused_qkv_is_zero():
    bridge = _bridge()
    snap = snapshot(bridge)
    full = HessianOperator(bridge, BATCHES, tlens_loss())
    qkv = [i for i, n in enumerate(full.layout.names) if ".qkv." in n]
    assert qkv, "expected the bridge's unused fused qkv copy"
    got_full = full @ _vec(full.size, 1)
    for i in qkv:  # unused by the forward: zero rows
        assert torch.all(got_full[full.layout.offsets[i] : full.layout.offsets[i + 1]] == 0)
    # q, k, v are views of the fused qkv weight's memory, so the in-place finite-difference
    # oracle (and the operator's finite-difference method) must leave qkv out
    no_qkv = ~match_names("*.qkv.*")
    H = HessianOperator(bridge, BATCHES, tlens_loss(), param_filter=no_qkv)
    v = _vec(H.size, 1)
    got = H @ v
    names = list(H.layout.names)
    want = _fd_hvp_in_place(bridge, BATCHES, tlens_loss(), v, _weight, names)
    assert rel_err(got, want) <= 1e-7
    unweighted = _fd_hvp_in_place(bridge, BATCHES, tlens_loss(), v, lambda b: 1, names)
    assert rel_err(unweighted, want) > 1e-3
    fd = HessianOperator(
        bridge, BATCHES, tlens_loss(), param_filter=no_qkv, method="finite_difference"
    )
    assert rel_err(fd @ v, got) <= 1e-8
    with pytest.raises(ValueError, match="share memory"):
        HessianOperator(bridge, BATCHES, tlens_loss(), method="finite_difference")
    assert_unchanged(bridge, snap)


def test_ggn_of_bridge_analytical_equals_autograd():
    bridge = _bridge()

    def ggn(loss_hvp):
        return GGNOperator(
            bridge,
            BATCHES,
            tlens_forward(),
            tlens_loss_of_output(fused="eager"),
            loss_hvp=loss_hvp,
        )

    v = _vec(ggn("analytical").size, 2)
    got = ggn("analytical") @ v
    assert rel_err(got, ggn("autograd") @ v) <= 1e-9
    assert float(v @ got) >= 0


def test_bridge_spectrum_equals_unwrapped_model():
    """Same function, parameters rearranged: the same top eigenvalues."""
    bridge, twin = _bridge(), _hf_gpt2()
    filt = ["*.attn.*", "*.mlp.*"]  # blocks only (not the unused fused qkv: "*.qkv.*")
    ours = HessianOperator(bridge, BATCHES, tlens_loss(), param_filter=filt)
    labels = [{"input_ids": t, "labels": t} for t in BATCHES]
    ref = HessianOperator(twin, labels, hf_lm_loss(from_logits=True), param_filter=filt)
    assert ours.size - ref.size == sum(
        p.numel() for n, p in bridge.named_parameters() if ".qkv." in n
    )
    a = lanczos(ours, k=4, seed=0, tol=1e-10)
    b = lanczos(ref, k=4, seed=0, tol=1e-10)
    assert a.all_converged and b.all_converged
    assert rel_err(a.eigenvalues, b.eigenvalues) <= 1e-8


def test_bridge_lm_head_is_chunked_exactly():
    # the bridge's W_U is the transpose of the HuggingFace lm_head weight (tied to the
    # input embedding): the chunked products must credit that parameter in its own layout
    from hessian_eigenthings import EmpiricalFisherOperator
    from hessian_eigenthings.loss_fns.transformer_lens import tlens_per_sample_loss

    bridge = _bridge()
    no_qkv = ~match_names("*.qkv.*")
    makers = {
        "ggn": lambda **kw: GGNOperator(
            bridge, BATCHES, tlens_forward, tlens_loss_of_output(fused="eager"), **kw
        ),
        "fisher": lambda **kw: EmpiricalFisherOperator(
            bridge, BATCHES, tlens_per_sample_loss(), **kw
        ),
        "hessian": lambda **kw: HessianOperator(bridge, BATCHES, tlens_loss(), **kw),
    }
    for kind, make in makers.items():
        chunked = make(lm_head="chunked", lm_head_chunk=4, param_filter=no_qkv)
        plain = make(lm_head="off", param_filter=no_qkv)
        v = _vec(chunked.size, 2)
        assert rel_err(chunked.matvec(v), plain.matvec(v)) <= 1e-10, kind

"""Language-model products with the LM head chunked over tokens: exact, and no (tokens x V) tensor.

With a library LM loss (it declares ``head_ce``) on a model whose logits are its output
embedding's output, the GGN, empirical Fisher and Hessian products run the model up to
the head's input and apply the head and the loss chunk by chunk. Oracle: the same
operator with ``lm_head="off"`` (the unchunked products, themselves tested against dense
float64 matrices elsewhere), in float64, to 1e-10 relative. Memory is a countable
property here: no tensor of ``tokens x V`` elements is created during a chunked product
(recorded by a dispatch mode), while the unchunked product creates several.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hessian_eigenthings import EmpiricalFisherOperator, GGNOperator, HessianOperator
from hessian_eigenthings.loss_fns.huggingface import (
    hf_lm_forward,
    hf_lm_loss,
    hf_lm_loss_of_output,
    hf_lm_per_sample_loss,
)
from tests.helpers import assert_unchanged, rel_err, snapshot

transformers = pytest.importorskip("transformers")

DT = torch.float64
VOCAB = 37


def _gpt2(seed: int = 0, **overrides: Any) -> nn.Module:
    torch.manual_seed(seed)
    settings: dict[str, Any] = {
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 8,
        "vocab_size": VOCAB,
        "n_positions": 16,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    cfg = transformers.GPT2Config(**{**settings, **overrides})
    return transformers.AutoModelForCausalLM.from_config(cfg).to(DT).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    labels = ids.clone()
    labels[0, 6:] = -100  # padding
    labels[2, :] = -100  # a sequence with nothing counted
    labels[2, 4] = ids[2, 4]
    short = torch.randint(0, VOCAB, (2, 7), generator=g)
    return [{"input_ids": ids, "labels": labels}, {"input_ids": short, "labels": short.clone()}]


def _v(op: Any, seed: int = 2) -> torch.Tensor:
    return torch.randn(op.size, dtype=DT, generator=torch.Generator().manual_seed(seed))


OPERATORS = {
    "ggn": lambda m, d, **kw: GGNOperator(
        m, d, hf_lm_forward, hf_lm_loss_of_output(fused="eager"), **kw
    ),
    "fisher": lambda m, d, **kw: EmpiricalFisherOperator(m, d, hf_lm_per_sample_loss(), **kw),
    "hessian": lambda m, d, **kw: HessianOperator(m, d, hf_lm_loss(from_logits=True), **kw),
}
OPTIONS = [
    {"lm_head_chunk": 1},
    {"lm_head_chunk": 4},
    {"lm_head_chunk": 4, "microbatch_size": 2},
    {"lm_head_chunk": 3, "param_filter": ["transformer.wte.weight"]},  # the tied head weight
    {"lm_head_chunk": 3, "param_filter": ["transformer.h.1.*"]},  # trunk only
    {},  # the default chunk (2^22 / V tokens: one chunk here)
]


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_chunked_product_equals_the_unchunked_one(kind: str, opts: dict[str, Any]) -> None:
    model, data = _gpt2(), _batches()
    snap = snapshot(model)
    chunked = OPERATORS[kind](model, data, lm_head="chunked", **opts)
    plain = OPERATORS[kind](
        model, data, lm_head="off", **{k: v for k, v in opts.items() if k != "lm_head_chunk"}
    )
    assert chunked._head is not None and plain._head is None
    for seed in range(2):
        v = _v(chunked, seed)
        assert rel_err(chunked.matvec(v), plain.matvec(v)) <= 1e-10
    assert_unchanged(model, snap)


@contextmanager
def _trunk_forwards(model: nn.Module) -> Iterator[dict[str, int]]:
    """Counts the calls of the GPT-2 trunk (``calls["n"]``) while the block runs."""
    calls = {"n": 0}

    def count(_m: nn.Module, _args: Any) -> None:
        calls["n"] += 1

    handle = model.transformer.register_forward_pre_hook(count)
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_chunked_block_equals_unchunked_columns_and_shares_the_trunk(
    kind: str, batched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block of 3 through the chunked head: each column equals the unchunked product,
    and the trunk's forward runs once per (micro)batch for the Hessian (its first
    backward shared too); the GGN and empirical Fisher add one batched forward-mode pass
    for the block's tangents, or, where vmap cannot carry the model (simulated here), one
    per vector."""
    from hessian_eigenthings.operators import _lm_head

    if not batched:

        def no_vmap(*_a: Any, **_k: Any) -> Any:
            raise RuntimeError("vmap: unsupported op (simulated)")

        monkeypatch.setattr(_lm_head, "vmap", no_vmap)
    model, data = _gpt2(), _batches()
    chunked = OPERATORS[kind](model, data, lm_head="chunked", lm_head_chunk=4)
    plain = OPERATORS[kind](model, data, lm_head="off")
    V = torch.stack([_v(chunked, s) for s in range(3)], dim=1)
    with _trunk_forwards(model) as calls:
        got = chunked.matmat(V)
    want = torch.stack([plain.matvec(V[:, j]) for j in range(3)], dim=1)
    assert rel_err(got, want) <= 1e-10
    per_batch = 1 if kind == "hessian" else 1 + (1 if batched else 3)
    assert calls["n"] == per_batch * len(data)


def test_chunked_block_respects_max_block() -> None:
    model, data = _gpt2(), _batches()
    op = OPERATORS["ggn"](model, data, lm_head="chunked", max_block=2)
    plain = OPERATORS["ggn"](model, data, lm_head="off")
    V = torch.stack([_v(op, s) for s in range(5)], dim=1)
    with _trunk_forwards(model) as calls:
        got = op.matmat(V)
    assert rel_err(got, plain.matmat(V)) <= 1e-10
    assert calls["n"] == 3 * 2 * len(data)  # chunks of 2, 2, 1: a tangent pass and a forward each


def test_auto_is_the_default_and_chunks_library_lm_losses() -> None:
    model, data = _gpt2(), _batches()
    for kind, make in OPERATORS.items():
        assert make(model, data)._head is not None, kind
    # HuggingFace's own loss (float32 inside) is chunked too; float64 chunked vs float64 plain
    op = HessianOperator(model, data, hf_lm_loss())
    ref = HessianOperator(model, data, hf_lm_loss(from_logits=True), lm_head="off")
    assert op._head is not None
    v = _v(op)
    assert rel_err(op.matvec(v), ref.matvec(v)) <= 1e-10


# ---------------------------------------------------------------- never (tokens x V)
class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_no_tokens_by_vocabulary_tensor_in_a_chunked_product(kind: str) -> None:
    vocab, rows, length, chunk = 1000, 2, 32, 8
    model = _gpt2(vocab_size=vocab, n_positions=length)
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": ids, "labels": ids.clone()}]
    tokens = ids.numel()
    for mode in ("chunked", "off"):
        op = OPERATORS[kind](model, data, lm_head=mode, lm_head_chunk=chunk)
        with _LargestTensor() as rec:
            op.matvec(_v(op))
        if mode == "off":
            assert rec.largest >= tokens * vocab
        else:
            # a chunk of logits, parameter-sized vectors (the tied embedding is V x d), and
            # the trunk's activations (attention scores: rows x heads x length^2)
            allowed = max(chunk * vocab, op.size, rows * 2 * length**2, tokens * 8 * 4)
            assert rec.largest <= allowed < tokens * vocab


# ---------------------------------------------------------------- when it does not apply
def _scaled_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    return 2.0 * hf_lm_forward(model, batch)  # logits transformed after the head


def test_transformed_logits_are_not_chunked(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hessian_eigenthings.operators import _lm_head

    monkeypatch.setattr(_lm_head, "_LOGGED", set())  # each reason is logged once a process
    model, data = _gpt2(), _batches()
    loss = hf_lm_loss_of_output(fused="eager")
    with caplog.at_level(logging.INFO, logger="hessian_eigenthings"):
        op = GGNOperator(model, data, _scaled_forward, loss)
    assert op._head is None
    assert "not the output embedding's output" in caplog.text
    with pytest.raises(ValueError, match="cannot chunk the LM head.*soft-capping or scaling"):
        GGNOperator(model, data, _scaled_forward, loss, lm_head="chunked")


def test_unsupported_configurations_say_why() -> None:
    model, data = _gpt2(), _batches()
    with pytest.raises(ValueError, match="finite differences"):
        HessianOperator(model, data, hf_lm_loss(), method="finite_difference", lm_head="chunked")
    with pytest.raises(ValueError, match="finite-difference JVPs"):
        GGNOperator(
            model,
            data,
            hf_lm_forward,
            hf_lm_loss_of_output(),
            jvp="finite_difference",
            lm_head="chunked",
        )
    # A reduced loss is refused by the per-sample contract before the head is looked at.
    with pytest.raises(ValueError, match="must return per-sample losses"):
        EmpiricalFisherOperator(model, data, hf_lm_loss(), lm_head="chunked")
    with pytest.raises(ValueError, match="does not declare"):
        HessianOperator(model, data, lambda m, b: m(**b).loss, lm_head="chunked")
    with pytest.raises(ValueError, match="Unknown lm_head"):
        HessianOperator(model, data, hf_lm_loss(), lm_head="yes")
    with pytest.raises(ValueError, match="lm_head_chunk must be a positive int"):
        HessianOperator(model, data, hf_lm_loss(), lm_head_chunk=0)


def test_model_without_a_linear_head_is_not_chunked() -> None:
    class NoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _gpt2()

        def forward(self, **kw: Any) -> Any:
            return self.inner(**kw)

    model, data = NoHead(), _batches()
    with pytest.raises(ValueError, match="no linear output embedding"):
        GGNOperator(model, data, hf_lm_forward, hf_lm_loss_of_output(), lm_head="chunked")


def test_head_weight_computed_from_parameters_is_not_chunked() -> None:
    # weight normalisation makes lm_head.weight a function of two parameters: chunking
    # with it as a constant would drop their derivatives, so it is refused (and auto falls
    # back to the unchunked product, which is exact)
    model, data = _gpt2(), _batches()
    model.lm_head = nn.utils.parametrizations.weight_norm(nn.Linear(8, VOCAB, bias=False)).to(DT)
    with pytest.raises(ValueError, match="computed from parameters"):
        HessianOperator(model, data, hf_lm_loss(from_logits=True), lm_head="chunked")
    auto = HessianOperator(model, data, hf_lm_loss(from_logits=True))
    off = HessianOperator(model, data, hf_lm_loss(from_logits=True), lm_head="off")
    assert auto._head is None
    v = _v(auto)
    assert rel_err(auto.matvec(v), off.matvec(v)) <= 1e-12


def test_determinism_probe_still_sees_dropout_when_chunked() -> None:
    model = _gpt2(resid_pdrop=0.3).train()
    with pytest.raises(ValueError, match="differs between two evaluations"):
        HessianOperator(model, _batches(), hf_lm_loss())


# ---------------------------------------------------------------- TransformerLens
def _tlens() -> Any:
    tl = pytest.importorskip("transformer_lens")
    cfg = tl.HookedTransformerConfig(
        n_layers=1,
        d_model=8,
        n_ctx=8,
        d_head=4,
        n_heads=2,
        d_vocab=11,
        d_mlp=16,
        act_fn="gelu",
        normalization_type="LN",
        dtype=DT,
        device="cpu",
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = tl.HookedTransformer(cfg)
    with torch.no_grad():
        model.unembed.b_U.normal_()  # a bias that matters
    return model.eval()


def test_transformer_lens_unembed_is_chunked_exactly() -> None:
    from hessian_eigenthings.loss_fns.transformer_lens import (
        tlens_forward,
        tlens_loss,
        tlens_loss_of_output,
        tlens_per_sample_loss,
    )

    model = _tlens()
    g = torch.Generator().manual_seed(0)
    data = [
        torch.randint(0, 11, (3, 6), generator=g),
        {
            "tokens": torch.randint(0, 11, (2, 5), generator=g),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
        },
    ]
    makers = {
        "ggn": lambda **kw: GGNOperator(
            model, data, tlens_forward, tlens_loss_of_output(fused="eager"), **kw
        ),
        "fisher": lambda **kw: EmpiricalFisherOperator(model, data, tlens_per_sample_loss(), **kw),
        "hessian": lambda **kw: HessianOperator(model, data, tlens_loss(), **kw),
    }
    for kind, make in makers.items():
        chunked, plain = make(lm_head="chunked", lm_head_chunk=4), make(lm_head="off")
        v = _v(chunked)
        assert rel_err(chunked.matvec(v), plain.matvec(v)) <= 1e-10, kind


@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_chunked_products_synchronise_once(kind: str) -> None:
    from tests._host_syncs import HostSyncCounter

    model, data = _gpt2(), _batches()
    op = OPERATORS[kind](model, data, lm_head="chunked", lm_head_chunk=4)
    v = _v(op)
    op.matvec(v)
    with HostSyncCounter() as c:
        op.matvec(v)
    assert c.syncs == 1, c.events

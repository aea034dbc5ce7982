"""HessianOperator against dense float64 Hessians and finite differences of gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hessian_eigenthings import HessianOperator, match_names, match_regex
from tests.helpers import assert_unchanged, dense_hessian, fd_hvp, rel_err, snapshot

F = nn.functional
DT = torch.float64


def ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Softplus(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    ).to(DT)


class LNEmbed(nn.Module):
    """Embedding + LayerNorm + GELU head, and a submodule that never reaches the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)
        self.unused = nn.Linear(4, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.emb(idx)).mean(1)
        return self.fc(F.gelu(h))


def ragged(x_shape: tuple[int, ...], sizes=(7, 3, 5), seed: int = 1, ints: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        if ints:
            x = torch.randint(0, ints, (n, *x_shape), generator=g)
        else:
            x = torch.randn(n, *x_shape, generator=g, dtype=DT)
        out.append((x, torch.randint(0, 3, (n,), generator=g)))
    return out


CASES = {
    "mlp": (mlp, lambda: ragged((5,))),
    "cnn": (cnn, lambda: ragged((2, 4, 4))),
    "ln_embed_unused": (lambda: LNEmbed().to(DT), lambda: ragged((4,), ints=11)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_matches_dense_hessian_on_ragged_batches(name: str, microbatch_size: int | None) -> None:
    make_model, make_data = CASES[name]
    model, data = make_model(), make_data()
    H = dense_hessian(model, data, ce)
    op = HessianOperator(model, data, ce, microbatch_size=microbatch_size)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = torch.randn(op.size, generator=g, dtype=DT)
        assert rel_err(op.matvec(v), H @ v) <= 1e-8
    # the full matrix, column by column, including the zero block of unused params
    dense = op.matmat(torch.eye(op.size, dtype=DT))
    assert rel_err(dense, H) <= 1e-8


def test_unused_parameters_give_zero_rows() -> None:
    model, data = LNEmbed().to(DT), ragged((4,), ints=11)
    op = HessianOperator(model, data, ce)
    lo, hi = (
        op.layout.offsets[op.layout.names.index("unused.weight")],
        op.layout.offsets[-1],
    )
    out = op.matvec(torch.randn(op.size, dtype=DT))
    assert torch.count_nonzero(out[lo:hi]) == 0
    only_unused = HessianOperator(model, data, ce, param_filter="unused.*")
    assert torch.count_nonzero(only_unused.matvec(torch.randn(only_unused.size, dtype=DT))) == 0


def test_sample_weighting_not_batch_mean() -> None:
    """A plain mean over batches would weight the 3-sample batch like the 7-sample one."""
    model, data = mlp(), ragged((5,))
    H = dense_hessian(model, data, ce)
    unweighted = sum(dense_hessian(model, [b], ce) for b in data) / len(data)
    op = HessianOperator(model, data, ce)
    v = torch.randn(op.size, dtype=DT)
    assert rel_err(op.matvec(v), H @ v) <= 1e-10
    assert rel_err(op.matvec(v), unweighted @ v) > 1e-3


@pytest.mark.parametrize(
    "filt",
    [
        match_names("2.*"),
        match_regex(r"weight$"),
        ["0.bias", "2.weight"],
        lambda n, p: p.dim() == 1,
    ],
)
def test_param_filter_sub_blocks(filt: Any) -> None:
    model, data = mlp(), ragged((5,))
    op = HessianOperator(model, data, ce, param_filter=filt)
    names = list(op.layout.names)
    H = dense_hessian(model, data, ce, names=names)
    v = torch.randn(op.size, dtype=DT)
    assert rel_err(op.matvec(v), H @ v) <= 1e-8


def test_num_batches_uses_prefix() -> None:
    model, data = mlp(), ragged((5,))
    op = HessianOperator(model, data, ce, num_batches=2)
    v = torch.randn(op.size, dtype=DT)
    assert rel_err(op.matvec(v), dense_hessian(model, data[:2], ce) @ v) <= 1e-10


def test_stochastic_mode_cycles_batches() -> None:
    model, data = mlp(), ragged((5,))
    op = HessianOperator(model, data, ce, full_dataset=False)
    v = torch.randn(op.size, dtype=DT)
    per_batch = [dense_hessian(model, [b], ce) @ v for b in data]
    for i in range(7):  # more matvecs than batches: wraps to a new epoch
        assert rel_err(op.matvec(v), per_batch[i % 3]) <= 1e-10


def test_batch_structures_and_factories() -> None:
    model, data = mlp(), ragged((5,))
    H = dense_hessian(model, data, ce)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    want = H @ v

    dict_data = [{"x": x, "y": y} for x, y in data]

    def dict_loss(m: nn.Module, b: dict) -> torch.Tensor:
        return F.cross_entropy(m(b["x"]), b["y"])

    op = HessianOperator(model, dict_data, dict_loss, microbatch_size=3)
    assert rel_err(op.matvec(v), want) <= 1e-10

    def factory():
        yield from data

    op = HessianOperator(model, factory, ce)
    assert rel_err(op.matvec(v), want) <= 1e-10
    assert rel_err(op.matvec(v), want) <= 1e-10  # re-iterates

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
        ),
        batch_size=4,
    )
    op = HessianOperator(model, loader, ce)
    assert rel_err(op.matvec(v), want) <= 1e-10


def test_batchnorm_eval_microbatches_and_train_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    data = ragged((5,))
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for x, _ in data:
            model(x)
    model.eval()
    H = dense_hessian(model, data, ce)
    op = HessianOperator(model, data, ce, microbatch_size=2)
    v = torch.randn(op.size, dtype=DT)
    assert rel_err(op.matvec(v), H @ v) <= 1e-8

    model.train()
    H_train = dense_hessian(model, data, ce)  # functional oracle, train-mode batch stats
    snap = snapshot(model)  # (the oracle itself updates running stats; the operator must not)
    op = HessianOperator(model, data, ce)
    assert rel_err(op.matvec(v), H_train @ v) <= 1e-8
    assert_unchanged(model, snap)  # running stats restored
    with pytest.raises(ValueError, match="BatchNorm1d in train mode"):
        HessianOperator(model, data, ce, microbatch_size=2).matvec(v)


# --- per-layer exactness against finite differences of first-order gradients --------------


class Attn(nn.Module):
    """Single-head causal self-attention through scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 8)
        self.qkv = nn.Linear(8, 24)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.emb(idx))
        q, k, v = self.qkv(h).view(idx.shape[0], idx.shape[1], 3, 2, 4).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(a.transpose(1, 2).reshape(idx.shape[0], idx.shape[1], 8)[:, -1])


LAYERS = {
    "layernorm": lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)),
    "batchnorm_eval": lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)),
    "batchnorm_train": lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)),
    "gelu": lambda: nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3)),
    "gelu_tanh": lambda: nn.Sequential(nn.Linear(5, 6), nn.GELU("tanh"), nn.Linear(6, 3)),
    "groupnorm": lambda: nn.Sequential(nn.Linear(5, 6), nn.GroupNorm(2, 6), nn.Linear(6, 3)),
    "attention_sdpa": Attn,
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_hvp_matches_finite_differences(layer: str) -> None:
    torch.manual_seed(0)
    model = LAYERS[layer]().to(DT)
    if layer == "batchnorm_eval":
        with torch.no_grad():
            model[1].running_mean.normal_()
            model[1].running_var.uniform_(0.5, 2.0)
        model.eval()
    data = ragged((6,), ints=9) if layer == "attention_sdpa" else ragged((5,))
    op = HessianOperator(model, data, ce)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(op.size, generator=g, dtype=DT)
    want = fd_hvp(model, data, ce, v, h=1e-3)
    assert rel_err(op.matvec(v), want) <= 1e-9


def test_forced_decomposition_routing_is_exact() -> None:
    """The decomposed layer_norm/batch_norm/group_norm give the same HVP as the built-ins."""
    from hessian_eigenthings.operators import _autodiff_safety as safety

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.LayerNorm(6), nn.BatchNorm1d(6), nn.GroupNorm(3, 6), nn.Linear(6, 3)
    ).to(DT)
    data = ragged((5,))
    op = HessianOperator(model, data, ce)
    v = torch.randn(op.size, dtype=DT)
    builtin = op.matvec(v)
    real = safety.probe_second_order
    try:
        safety.probe_second_order = lambda dtype, device: frozenset(safety._DECOMPOSED)  # type: ignore[assignment]
        routed = op.matvec(v)
    finally:
        safety.probe_second_order = real
    assert rel_err(routed, builtin) <= 1e-12


def test_probe_reports_no_broken_norms_here() -> None:
    from hessian_eigenthings.operators._autodiff_safety import probe_second_order

    broken = probe_second_order(DT, torch.device("cpu"))
    assert isinstance(broken, frozenset)


# --- finite-difference method -------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_finite_difference_float64_linear_in_v(scale: float) -> None:
    model, data = mlp(), ragged((5,))
    H = dense_hessian(model, data, ce)
    op = HessianOperator(model, data, ce, method="finite_difference")
    g = torch.Generator().manual_seed(7)
    v = scale * torch.randn(op.size, generator=g, dtype=DT)
    assert rel_err(op.matvec(v), H @ v) <= 1e-6


def test_finite_difference_restores_parameters_exactly_and_on_error() -> None:
    model, data = mlp(), ragged((5,))
    snap = snapshot(model)
    op = HessianOperator(model, data, ce, method="finite_difference", microbatch_size=2)
    op.matvec(torch.randn(op.size, dtype=DT))
    assert_unchanged(model, snap)

    armed = {"on": False}

    def flaky(m: nn.Module, b: Any) -> torch.Tensor:
        if armed["on"]:  # after the construction probes: inside a perturbed gradient
            raise RuntimeError("boom")
        return ce(m, b)

    op = HessianOperator(model, data, flaky, method="finite_difference")
    armed["on"] = True
    with pytest.raises(RuntimeError, match="boom"):
        op.matvec(torch.randn(op.size, dtype=DT))
    assert_unchanged(model, snap)


def test_finite_difference_float32_error_is_small() -> None:
    model64, data64 = mlp(), ragged((5,))
    H = dense_hessian(model64, data64, ce)
    model = mlp().float()
    data = [(x.float(), y) for x, y in data64]
    op = HessianOperator(model, data, ce, method="finite_difference")
    v = torch.randn(op.size, dtype=torch.float32)
    err = rel_err(op.matvec(v), H @ v.double())
    assert err <= 5e-3  # eps^(2/3) ~ 2.4e-5 ideal; curvature-dependent constant


def test_zero_vector_gives_zero() -> None:
    model, data = mlp(), ragged((5,))
    for method in ("autograd", "finite_difference"):
        op = HessianOperator(model, data, ce, method=method)
        out = op.matvec(torch.zeros(op.size, dtype=DT))
        assert torch.count_nonzero(out) == 0 and torch.isfinite(out).all()


# --- precision ----------------------------------------------------------------------------


def test_higher_precision_vectors_for_low_precision_model() -> None:
    model = mlp().to(torch.bfloat16)
    data = [(x.to(torch.bfloat16), y) for x, y in ragged((5,))]
    op = HessianOperator(model, data, ce)
    assert op.dtype == torch.bfloat16
    v = torch.randn(op.size, dtype=torch.float32)
    out = op.matvec(v)
    assert out.dtype == torch.float32
    ref = HessianOperator(mlp(), ragged((5,)), ce).matvec(v.double())
    assert rel_err(out, ref) <= 0.1  # bfloat16 arithmetic (8 mantissa bits)


# --- model state --------------------------------------------------------------------------


def test_model_untouched_when_loss_raises() -> None:
    model, data = mlp(), ragged((5,))
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].bias.requires_grad_(False)
    snap = snapshot(model)
    state = {"raise": False}

    def loss(m: nn.Module, b: Any) -> torch.Tensor:
        m.eval()  # a loss that flips the mode must not leak it
        if state["raise"]:
            raise RuntimeError("bad batch")
        return ce(m, b)

    op = HessianOperator(model, data, loss, param_filter="2.*")
    assert_unchanged(model, snap)
    op.matvec(torch.randn(op.size, dtype=DT))
    assert_unchanged(model, snap)
    state["raise"] = True
    with pytest.raises(RuntimeError, match="bad batch"):
        op.matvec(torch.randn(op.size, dtype=DT))
    assert_unchanged(model, snap)


def test_determinism_probe_names_dropout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.Linear(7, 3)).to(DT)
    data = ragged((5,))
    model.train()
    rng = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=r"1 \(Dropout, p=0.5\).*model.eval\(\)"):
        HessianOperator(model, data, ce)
    assert torch.equal(torch.random.get_rng_state(), rng)  # probe leaves the RNG alone
    model.eval()
    HessianOperator(model, data, ce)  # fine in eval mode
    model.train()
    HessianOperator(model, data, ce, check_determinism=False)  # explicit opt-out


# --- bad input ----------------------------------------------------------------------------


def test_bad_vectors_raise_clear_errors() -> None:
    model, data = mlp(), ragged((5,))
    op = HessianOperator(model, data, ce)
    n = op.size
    with pytest.raises(ValueError, match=rf"shape \({n},\), got shape \({n + 1},\)"):
        op.matvec(torch.randn(n + 1, dtype=DT))
    with pytest.raises(ValueError, match="Use matmat"):
        op.matvec(torch.randn(n, 2, dtype=DT))
    with pytest.raises(TypeError, match="lower precision torch.float32"):
        op.matvec(torch.randn(n, dtype=torch.float32))
    with pytest.raises(TypeError, match="floating"):
        op.matvec(torch.ones(n, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        op.matvec([0.0] * n)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        op.matvec(torch.randn(n, dtype=DT, device="meta"))
    with pytest.raises(ValueError, match=rf"\({n}, b\)"):
        op.matmat(torch.randn(n + 1, 2, dtype=DT))


def test_bad_construction_raises_clear_errors() -> None:
    model, data = mlp(), ragged((5,))
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, [], ce)
    with pytest.raises(ValueError, match="selected no parameters.*Close names"):
        HessianOperator(model, data, ce, param_filter="encoder.*")
    with pytest.raises(ValueError, match="Unknown method 'exact'"):
        HessianOperator(model, data, ce, method="exact")
    with pytest.raises(TypeError, match="one-shot iterator"):
        HessianOperator(model, iter(data), ce)
    with pytest.raises(ValueError, match="microbatch_size must be a positive int"):
        HessianOperator(model, data, ce, microbatch_size=0)
    with pytest.raises(ValueError, match="scalar tensor"):
        HessianOperator(model, data, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    with pytest.raises(TypeError, match="nn.Module"):
        HessianOperator(lambda x: x, data, ce)  # type: ignore[arg-type]
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        HessianOperator(frozen, data, ce)


def test_weight_fn_overrides_batch_size() -> None:
    """weight_fn defines each batch's weight in the mean (here: double weight for batch 0)."""
    model, data = mlp(), ragged((5,))
    weights = {id(b[0]): (2 * len(b[0]) if i == 0 else len(b[0])) for i, b in enumerate(data)}

    def wfn(batch: Any) -> int:
        return weights[id(batch[0])]

    op = HessianOperator(model, data, ce, weight_fn=wfn)
    H = dense_hessian(model, data, ce, weight=wfn)
    v = torch.randn(op.size, dtype=DT)
    assert rel_err(op.matvec(v), H @ v) <= 1e-10


def test_data_loop_hands_each_hook_its_batch_and_microbatch_index_and_weight() -> None:
    """A recording operator with C_b = diag(b + 1): the loop must pass every (micro)batch
    once with its loader index, its index in the split and its sample count, skip the
    empty one, and return the sample-weighted mean of the per-piece products."""
    from collections.abc import Sequence

    from hessian_eigenthings import DataCurvatureOperator
    from hessian_eigenthings.operators._data import Piece

    class Recorder(DataCurvatureOperator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.seen: list[tuple[int, int, int]] = []
            super().__init__(*args, **kwargs)

        def _probe_loss(self, batch: Any) -> torch.Tensor:
            return torch.zeros(())

        def _piece_product(
            self, piece: Piece, vs: Sequence[torch.Tensor]
        ) -> Sequence[torch.Tensor | None]:
            assert isinstance(piece.weight, int) and piece.weight == piece.data[0].shape[0]
            self.seen.append((piece.batch_index, piece.microbatch_index, piece.weight))
            return [v * (piece.batch_index + 1) for v in vs]

    model = nn.Linear(2, 1).double()
    sizes = [5, 0, 2, 4]
    data = [(torch.randn(n, 2, dtype=torch.float64), torch.randn(n, 1)) for n in sizes]
    op = Recorder(model, data, microbatch_size=2)
    v = torch.randn(op.size, dtype=torch.float64)
    got = op.matvec(v)
    assert op.seen == [(0, 0, 2), (0, 1, 2), (0, 2, 1), (2, 0, 2), (3, 0, 2), (3, 1, 2)]
    want = v * sum(n * (b + 1) for b, n in enumerate(sizes)) / sum(sizes)
    assert torch.allclose(got, want, rtol=1e-14, atol=0)
    # full_dataset=False: one batch per product, numbered by its position in the loader
    op = Recorder(model, [data[0], data[2], data[3]], full_dataset=False)
    for _ in range(5):
        op.matvec(v)
    assert op.seen == [(0, 0, 5), (1, 0, 2), (2, 0, 4), (0, 0, 5), (1, 0, 2)]

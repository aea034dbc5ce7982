"""GGNOperator against a dense float64 oracle built from first-order autograd only.

Oracle: G = (1/W) sum_b w_b J_b^T H_b J_b with J_b the output Jacobian (torch.func.jacrev,
first order) and H_b the Hessian of torch's own loss with respect to the output only
(torch.func.hessian of a function of the output; no parameter enters it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from hessian_eigenthings import GGNOperator, HessianOperator
from hessian_eigenthings.loss_fns.base import LossOfOutput, loss_of_output
from hessian_eigenthings.loss_fns.standard import (
    cross_entropy_loss_of_output,
    mse_loss_of_output,
    supervised_forward,
    supervised_loss,
)
from tests.helpers import assert_unchanged, rel_err, snapshot

Batch = Any


def dense(op: GGNOperator) -> torch.Tensor:
    return op.matmat(torch.eye(op.size, dtype=torch.float64))


def oracle_ggn(
    model: nn.Module,
    batches: Sequence[Batch],
    forward: Callable[[nn.Module, Batch], torch.Tensor],
    loss: Callable[[torch.Tensor, Batch], torch.Tensor],
    weight: Callable[[Batch], float],
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    named = dict(model.named_parameters())
    names = list(names) if names is not None else list(named)
    base = [named[n].detach() for n in names]
    flat = torch.cat([p.reshape(-1) for p in base])
    sizes, shapes = [p.numel() for p in base], [p.shape for p in base]

    total = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    wsum = 0.0
    for b in batches:
        w = float(weight(b))
        if w == 0:
            continue

        def out_of(theta: torch.Tensor, b: Batch = b) -> torch.Tensor:
            params = {n: t.view(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
            # fresh buffer copies made inside the transform (train-mode BatchNorm updates them)
            params.update({n: buf.clone() for n, buf in model.named_buffers()})

            class Proxy(nn.Module):
                def __getattr__(self, item: str) -> Any:
                    return getattr(model, item)

                def __call__(self, *a: Any) -> Any:
                    return functional_call(model, params, a)

            return forward(Proxy(), b)

        out = out_of(flat).detach()
        J = jacrev(lambda t, f=out_of: f(t).reshape(-1))(flat)
        H = hessian(lambda o, b=b, shape=out.shape: loss(o.view(shape), b))(out.reshape(-1))
        total += w * J.T @ H @ J
        wsum += w
    return (total / wsum).detach()


def _mlp(seed: int = 0, out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).double()


def _class_data(sizes: Sequence[int] = (7, 3, 5), classes: int = 3) -> list[Batch]:
    g = torch.Generator().manual_seed(11)
    return [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g),
        )
        for n in sizes
    ]


def _reg_data(sizes: Sequence[int] = (7, 3, 5)) -> list[Batch]:
    g = torch.Generator().manual_seed(12)
    return [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randn(n, 3, generator=g, dtype=torch.float64),
        )
        for n in sizes
    ]


def _ce(o: torch.Tensor, b: Batch) -> torch.Tensor:
    return F.cross_entropy(o, b[1])


def _mse(o: torch.Tensor, b: Batch) -> torch.Tensor:
    return ((o - b[1]) ** 2).mean()


def _samples(b: Batch) -> float:
    return float(b[0].shape[0])


OPTIONS = [
    {},
    {"loss_hvp": "autograd"},
    {"param_filter": "2.*"},
    {"param_filter": ["0.weight", "2.bias"], "microbatch_size": 2},
    {"microbatch_size": 3},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_ggn_matches_dense_oracle(kind: str, opts: dict[str, Any]) -> None:
    model = _mlp()
    data = _class_data() if kind == "ce" else _reg_data()
    loss = cross_entropy_loss_of_output() if kind == "ce" else mse_loss_of_output()
    op = GGNOperator(model, data, supervised_forward, loss, **opts)
    names = [n for n, _ in op.named_params]
    want = oracle_ggn(
        model, data, supervised_forward, _ce if kind == "ce" else _mse, _samples, names
    )
    assert op.size == want.shape[0]
    assert rel_err(dense(op), want) <= 1e-9


def test_finite_difference_jvp_matches_oracle() -> None:
    model = _mlp()
    data = _class_data()
    op = GGNOperator(
        model, data, supervised_forward, cross_entropy_loss_of_output(), jvp="finite_difference"
    )
    want = oracle_ggn(model, data, supervised_forward, _ce, _samples)
    # central difference with h = eps^(1/3): O(h^2) truncation + O(eps/h) rounding ~ 1e-10
    assert rel_err(dense(op), want) <= 1e-8
    snap = snapshot(model)
    op.matvec(torch.randn(op.size, dtype=torch.float64))
    assert_unchanged(model, snap)  # parameters restored bit for bit


def test_analytical_path_never_differentiates_the_loss() -> None:
    """The default path only calls .hvp: the loss value itself is never evaluated."""
    ce = cross_entropy_loss_of_output()

    def forbidden(o: torch.Tensor, b: Batch) -> torch.Tensor:
        raise AssertionError("the loss was evaluated (a double backward path)")

    loss = loss_of_output(forbidden, hvp=ce.hvp, batch_weight=ce.batch_weight)
    model = _mlp(5)
    data = _class_data()
    op = GGNOperator(model, data, supervised_forward, loss, check_determinism=False)
    want = oracle_ggn(model, data, supervised_forward, _ce, _samples)
    assert rel_err(dense(op), want) <= 1e-9


def test_default_path_equals_autograd_path() -> None:
    model = _mlp(3)
    data = _class_data()
    loss = cross_entropy_loss_of_output(label_smoothing=0.1)
    a = GGNOperator(model, data, supervised_forward, loss)
    b = GGNOperator(model, data, supervised_forward, loss, loss_hvp="autograd")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = torch.randn(a.size, generator=g, dtype=torch.float64)
        assert rel_err(a.matvec(v), b.matvec(v)) <= 1e-13


class TokenModel(nn.Module):
    """(N, T, d) -> logits (N, C, T), the layout F.cross_entropy wants for tokens."""

    def __init__(self, d: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(d, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x))).transpose(1, 2)


def _token_data() -> list[Batch]:
    g = torch.Generator().manual_seed(5)
    batches = []
    for n, t in ((3, 4), (2, 4), (4, 4), (2, 4)):
        x = torch.randn(n, t, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (n, t), generator=g)
        y[torch.rand(n, t, generator=g) < 0.4] = -100
        batches.append((x, y))
    batches[3][1].fill_(-100)  # an all-ignored batch: weight 0, must contribute nothing
    return batches


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("loss_hvp", ["analytical", "autograd"])
def test_token_level_weighting_with_ignored_targets(weighted: bool, loss_hvp: str) -> None:
    torch.manual_seed(2)
    model = TokenModel().double()
    data = _token_data()
    cw = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64) if weighted else None
    op = GGNOperator(
        model,
        data,
        supervised_forward,
        cross_entropy_loss_of_output(weight=cw),
        loss_hvp=loss_hvp,
        microbatch_size=2,
    )

    def torch_loss(o: torch.Tensor, b: Batch) -> torch.Tensor:
        return F.cross_entropy(o, b[1], weight=cw)

    def tokens(b: Batch) -> float:  # non-ignored targets, class-weighted if weighted
        valid = b[1] != -100
        if cw is None:
            return float(valid.sum())
        return float((cw[b[1].clamp_min(0)] * valid).sum())

    # oracle over microbatches of 2 = same dataset; split it the same way for the loss
    pieces = [(x[i : i + 2], y[i : i + 2]) for x, y in data for i in range(0, x.shape[0], 2)]
    want = oracle_ggn(model, pieces, supervised_forward, torch_loss, tokens)
    got = dense(op)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= 1e-9
    # and the operator is the GGN of the mean over ALL tokens: the oracle on one big batch
    x_all = torch.cat([x for x, _ in data])
    y_all = torch.cat([y for _, y in data])
    big = oracle_ggn(model, [(x_all, y_all)], supervised_forward, torch_loss, tokens)
    assert rel_err(got, big) <= 1e-9


def test_quadratic_form_never_negative() -> None:
    model = _mlp(7)
    data = _class_data()
    op = GGNOperator(model, data, supervised_forward, cross_entropy_loss_of_output())
    assert op.psd and op.symmetric
    g = torch.Generator().manual_seed(3)
    V = torch.randn(op.size, 40, generator=g, dtype=torch.float64)
    forms = (V * op.matmat(V)).sum(0)
    assert (forms >= 0).all()
    evals = torch.linalg.eigvalsh(dense(op))
    assert evals.min() >= -1e-14 * evals.max()


def test_stochastic_mode_cycles_batches() -> None:
    model = _mlp(1)
    data = _class_data()
    op = GGNOperator(
        model, data, supervised_forward, cross_entropy_loss_of_output(), full_dataset=False
    )
    v = torch.randn(op.size, dtype=torch.float64)
    for k in (0, 1, 2, 0):
        want = oracle_ggn(model, [data[k]], supervised_forward, _ce, _samples) @ v
        assert rel_err(op.matvec(v), want) <= 1e-9


class Partial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_parameters_not_reaching_output_give_zero_rows() -> None:
    torch.manual_seed(0)
    model = Partial().double()
    data = _class_data()
    op = GGNOperator(model, data, supervised_forward, cross_entropy_loss_of_output())
    m = dense(op)
    assert torch.count_nonzero(m[15:]) == 0 and torch.count_nonzero(m[:, 15:]) == 0
    want = oracle_ggn(model, data, supervised_forward, _ce, _samples, ["used.weight", "used.bias"])
    assert rel_err(m[:15, :15], want) <= 1e-9
    only_unused = GGNOperator(
        model, data, supervised_forward, cross_entropy_loss_of_output(), param_filter="unused.*"
    )
    assert torch.count_nonzero(dense(only_unused)) == 0


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_tied_weights() -> None:
    torch.manual_seed(4)
    model = Tied().double()
    g = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(6, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g),
        )
    ]
    op = GGNOperator(model, data, supervised_forward, cross_entropy_loss_of_output())
    assert op.size == 12
    want = oracle_ggn(model, data, supervised_forward, _ce, _samples)
    assert rel_err(dense(op), want) <= 1e-9


def test_batchnorm_train_mode_forward_ad_and_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    model.train()
    data = _class_data((6, 4))
    snap = snapshot(model)
    op = GGNOperator(model, data, supervised_forward, cross_entropy_loss_of_output())
    got = dense(op)
    assert_unchanged(model, snap)  # running statistics restored
    want = oracle_ggn(model, data, supervised_forward, _ce, _samples)
    assert_unchanged(model, snap)
    assert rel_err(got, want) <= 1e-9


def test_custom_loss_with_attached_hvp() -> None:
    def hvp(o: torch.Tensor, b: Batch, u: torch.Tensor) -> torch.Tensor:
        return u * 2 * b[2] / o.shape[0]

    loss = loss_of_output(lambda o, b: (b[2] * (o - b[1]) ** 2).sum() / o.shape[0], hvp=hvp)
    model = _mlp()
    g = torch.Generator().manual_seed(8)
    data = [
        (x, y, torch.rand(x.shape[0], 3, generator=g, dtype=torch.float64)) for x, y in _reg_data()
    ]
    op = GGNOperator(model, data, supervised_forward, loss)
    want = oracle_ggn(model, data, supervised_forward, loss, _samples)
    assert rel_err(dense(op), want) <= 1e-9


def test_float32_model_with_float64_vectors() -> None:
    model = _mlp().float()
    data = [(x.float(), y) for x, y in _class_data()]
    op = GGNOperator(model, data, supervised_forward, cross_entropy_loss_of_output())
    assert op.dtype == torch.float32
    v = torch.randn(op.size, dtype=torch.float64)
    out = op.matvec(v)
    assert out.dtype == torch.float64
    want = oracle_ggn(_mlp(), _class_data(), supervised_forward, _ce, _samples) @ v
    assert rel_err(out, want) <= 1e-5


class NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return g * (1 - y**2)


class CustomAct(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NoJvp.apply(x)


def test_layer_without_forward_ad_names_layer_and_fallback() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), CustomAct(), nn.Linear(5, 3)).double()
    data = _class_data()
    op = GGNOperator(model, data, supervised_forward, cross_entropy_loss_of_output())
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"module 1 \(CustomAct\).*jvp='finite_difference'"):
        op.matvec(torch.randn(op.size, dtype=torch.float64))
    assert_unchanged(model, snap)
    fd = GGNOperator(
        model, data, supervised_forward, cross_entropy_loss_of_output(), jvp="finite_difference"
    )
    ref = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ref.load_state_dict(model.state_dict())
    assert rel_err(dense(fd), oracle_ggn(ref, data, supervised_forward, _ce, _samples)) <= 1e-8


def test_errors() -> None:
    model = _mlp()
    data = _class_data()
    plain = LossOfOutput(_ce)
    with pytest.raises(ValueError, match="has none.*loss_hvp='autograd'"):
        GGNOperator(model, data, supervised_forward, plain)
    with pytest.raises(ValueError, match="has none"):
        GGNOperator(model, data, supervised_forward, _ce)
    GGNOperator(model, data, supervised_forward, _ce, loss_hvp="autograd")  # works without
    loss = cross_entropy_loss_of_output()
    with pytest.raises(ValueError, match="Unknown loss_hvp 'exact'"):
        GGNOperator(model, data, supervised_forward, loss, loss_hvp="exact")
    with pytest.raises(ValueError, match="Unknown jvp 'reverse'"):
        GGNOperator(model, data, supervised_forward, loss, jvp="reverse")
    with pytest.raises(ValueError, match="fd_eps must be positive"):
        GGNOperator(model, data, supervised_forward, loss, fd_eps=0.0)
    with pytest.raises(TypeError, match="forward_fn must return a tensor"):
        GGNOperator(model, data, lambda m, b: {"logits": m(b[0])}, loss)
    with pytest.raises(ValueError, match="scalar tensor"):
        GGNOperator(
            model,
            data,
            supervised_forward,
            lambda o, b: F.cross_entropy(o, b[1], reduction="none"),
            loss_hvp="autograd",
        )
    bad = loss_of_output(_ce, hvp=lambda o, b, u: u.sum(1))
    op = GGNOperator(model, data, supervised_forward, bad)
    with pytest.raises(ValueError, match="output's shape"):
        op.matvec(torch.randn(op.size, dtype=torch.float64))


def test_a_loss_factory_passed_uncalled_is_refused_with_the_call_to_write() -> None:
    model = nn.Linear(3, 2).double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,)))]
    with pytest.raises(TypeError, match=r"cross_entropy_loss_of_output, which makes a loss of"):
        GGNOperator(model, data, supervised_forward, cross_entropy_loss_of_output)
    with pytest.raises(
        TypeError, match=r"forward_fn got supervised_loss.*forward_fn=supervised_loss"
    ):
        GGNOperator(model, data, supervised_loss, cross_entropy_loss_of_output())
    with pytest.raises(TypeError, match=r"loss_fn=supervised_loss\(\.\.\.\)"):
        HessianOperator(model, data, supervised_loss)

"""Empirical and Monte-Carlo Fisher operators against first-order autograd oracles.

Empirical Fisher oracle: (1/N) sum_i g_i g_i^T from per-sample gradients (one
first-order backward per sample). MC Fisher: fixed-operator properties, and the
average over seeds and samples converges to the GGN (built here from the output
Jacobian and torch's loss Hessian w.r.t. the output) at the Monte-Carlo rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hessian_eigenthings import EmpiricalFisherOperator, GGNOperator, MCFisherOperator
from hessian_eigenthings.loss_fns.base import loss_of_output
from hessian_eigenthings.loss_fns.standard import (
    cross_entropy_loss_of_output,
    supervised_forward,
    supervised_loss,
)
from tests.helpers import assert_unchanged, rel_err, snapshot
from tests.test_ggn import oracle_ggn

Batch = Any


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(sizes: Sequence[int] = (7, 3, 5)) -> list[Batch]:
    g = torch.Generator().manual_seed(21)
    return [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in sizes
    ]


def per_sample_ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def oracle_empirical_fisher(
    model: nn.Module, batches: Sequence[Batch], names: Sequence[str] | None = None
) -> torch.Tensor:
    named = dict(model.named_parameters())
    params = [named[n] for n in (names if names is not None else list(named))]
    grads = []
    for x, y in batches:
        for i in range(x.shape[0]):
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            g = torch.autograd.grad(loss, params)
            grads.append(torch.cat([t.reshape(-1) for t in g]))
    Gm = torch.stack(grads)  # the oracle may form the N x n matrix; the operator must not
    return (Gm.T @ Gm / Gm.shape[0]).detach()


def dense(op: Any) -> torch.Tensor:
    return op.matmat(torch.eye(op.size, dtype=torch.float64))


@pytest.mark.parametrize(
    "opts",
    [{}, {"microbatch_size": 2}, {"param_filter": "2.*"}, {"jvp": "finite_difference"}],
    ids=str,
)
def test_empirical_fisher_matches_per_sample_gradients(opts: dict[str, Any]) -> None:
    model = _mlp()
    data = _data()
    op = EmpiricalFisherOperator(model, data, per_sample_ce, **opts)
    names = [n for n, _ in op.named_params]
    want = oracle_empirical_fisher(model, data, names)
    tol = 1e-8 if opts.get("jvp") == "finite_difference" else 1e-9  # FD: O(h^2) ~ 1e-10
    assert rel_err(dense(op), want) <= tol


def test_empirical_fisher_with_supervised_loss_and_quadratic_form() -> None:
    model = _mlp(2)
    data = _data((4, 6))
    op = EmpiricalFisherOperator(
        model, data, supervised_loss(nn.CrossEntropyLoss(reduction="none"))
    )
    assert op.psd and op.symmetric
    want = oracle_empirical_fisher(model, data)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(op.size, 30, generator=g, dtype=torch.float64)
    forms = (V * op.matmat(V)).sum(0)
    assert (forms >= 0).all()
    torch.testing.assert_close(forms, (V * (want @ V)).sum(0), rtol=1e-10, atol=0)


def test_empirical_fisher_stochastic_mode_and_state() -> None:
    model = _mlp(1)
    data = _data()
    op = EmpiricalFisherOperator(model, data, per_sample_ce, full_dataset=False)
    v = torch.randn(op.size, dtype=torch.float64)
    snap = snapshot(model)
    for k in (0, 1, 2, 0):
        assert rel_err(op.matvec(v), oracle_empirical_fisher(model, [data[k]]) @ v) <= 1e-9
    assert_unchanged(model, snap)


def test_empirical_fisher_errors() -> None:
    model = _mlp()
    data = _data()
    with pytest.raises(ValueError, match=r"shape \(B,\), got a scalar.*reduction='none'"):
        EmpiricalFisherOperator(model, data, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(ValueError, match=r"shape \(7, 3\)"):
        EmpiricalFisherOperator(model, data, lambda m, b: m(b[0]) ** 2)
    op = EmpiricalFisherOperator(
        model, data, lambda m, b: per_sample_ce(m, b)[:-1], check_determinism=False
    )
    with pytest.raises(ValueError, match="returned 6 per-sample losses for a batch of 7"):
        op.matvec(torch.randn(op.size, dtype=torch.float64))
    with pytest.raises(ValueError, match="Unknown jvp"):
        EmpiricalFisherOperator(model, data, per_sample_ce, jvp="backward")
    with pytest.raises(TypeError, match="callable"):
        EmpiricalFisherOperator(model, data, "ce")  # type: ignore[arg-type]


def _ggn_ce(model: nn.Module, data: list[Batch]) -> torch.Tensor:
    return oracle_ggn(
        model,
        data,
        supervised_forward,
        lambda o, b: F.cross_entropy(o, b[1]),
        lambda b: float(b[0].shape[0]),
    )


def test_mc_fisher_is_a_fixed_linear_operator() -> None:
    model = _mlp()
    data = _data()
    op = MCFisherOperator(model, data, supervised_forward, num_samples=2, seed=5, microbatch_size=3)
    assert op.psd and op.symmetric
    g = torch.Generator().manual_seed(1)
    u = torch.randn(op.size, generator=g, dtype=torch.float64)
    v = torch.randn(op.size, generator=g, dtype=torch.float64)
    Fu = op.matvec(u)
    assert torch.equal(op.matvec(u), Fu)  # same labels on every matvec
    lin = op.matvec(2.0 * u - 3.0 * v)
    assert rel_err(lin, 2.0 * Fu - 3.0 * op.matvec(v)) <= 1e-13
    M = dense(op)
    assert rel_err(M, M.T) <= 1e-13
    evals = torch.linalg.eigvalsh((M + M.T) / 2)
    assert evals.min() >= -1e-13 * evals.max()
    same = MCFisherOperator(
        model, data, supervised_forward, num_samples=2, seed=5, microbatch_size=3
    )
    assert torch.equal(same.matvec(u), Fu)
    other = MCFisherOperator(
        model, data, supervised_forward, num_samples=2, seed=6, microbatch_size=3
    )
    assert not torch.equal(other.matvec(u), Fu)
    fresh = MCFisherOperator(model, data, supervised_forward)
    assert isinstance(fresh.seed, int)


def test_mc_fisher_converges_to_ggn_at_monte_carlo_rate() -> None:
    """Mean relative error over seeds shrinks like 1/sqrt(S); the seed-average is unbiased."""
    model = _mlp(3)
    data = _data((6, 4))
    G = _ggn_ce(model, data)
    g = torch.Generator().manual_seed(2)
    V = torch.randn(G.shape[0], 4, generator=g, dtype=torch.float64)
    GV = G @ V
    sample_counts = [4, 16, 64, 256]
    seeds = range(6)
    errors = []
    mean_product = {}
    for s in sample_counts:
        prods = [
            MCFisherOperator(model, data, supervised_forward, num_samples=s, seed=seed).matmat(V)
            for seed in seeds
        ]
        errors.append(sum(rel_err(p, GV) for p in prods) / len(prods))
        mean_product[s] = sum(prods) / len(prods)
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (
        math.log(sample_counts[-1]) - math.log(sample_counts[0])
    )
    assert -0.7 <= slope <= -0.3, (errors, slope)
    assert errors[-1] <= 0.1
    # the average of 6 x 256 draws is 6 times more accurate than one 256-draw estimate
    assert rel_err(mean_product[256], GV) <= errors[-1] / math.sqrt(6) * 2


def test_mc_fisher_gaussian_converges_to_half_squared_error_ggn() -> None:
    model = _mlp(4)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(n, 4, generator=g, dtype=torch.float64), None) for n in (5, 3)]
    half_sq = loss_of_output(
        lambda o, b: 0.5 * (o**2).sum() / o.shape[0], hvp=lambda o, b, u: u / o.shape[0]
    )
    G = dense(GGNOperator(model, data, supervised_forward, half_sq))
    V = torch.randn(G.shape[0], 3, generator=g, dtype=torch.float64)
    errs = []
    for s in (8, 512):
        errs.append(
            sum(
                rel_err(
                    MCFisherOperator(
                        model,
                        data,
                        supervised_forward,
                        likelihood="gaussian",
                        num_samples=s,
                        seed=seed,
                    ).matmat(V),
                    G @ V,
                )
                for seed in range(4)
            )
            / 4
        )
    assert errs[1] <= errs[0] / 4  # sqrt(512 / 8) = 8 expected; 4 leaves room for noise
    assert errs[1] <= 0.1


class TokenLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, V) logits
        return self.head(torch.tanh(self.proj(x)))


def test_mc_fisher_class_dim_last_for_token_logits() -> None:
    torch.manual_seed(0)
    model = TokenLM().double()
    g = torch.Generator().manual_seed(4)
    data = [
        (
            torch.randn(n, 3, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (n, 3), generator=g),
        )
        for n in (2, 3)
    ]
    ggn = GGNOperator(
        model,
        data,
        lambda m, b: m(b[0]).transpose(1, 2),
        cross_entropy_loss_of_output(),
    )
    V = torch.randn(ggn.size, 3, generator=g, dtype=torch.float64)
    GV = ggn.matmat(V)
    errs = [
        rel_err(
            MCFisherOperator(
                model, data, supervised_forward, class_dim=-1, num_samples=400, seed=s
            ).matmat(V),
            GV,
        )
        for s in range(3)
    ]
    assert max(errs) <= 0.15


def test_mc_fisher_errors() -> None:
    model = _mlp()
    data = _data()
    with pytest.raises(ValueError, match="Unknown likelihood 'bernoulli'"):
        MCFisherOperator(model, data, supervised_forward, likelihood="bernoulli")
    with pytest.raises(ValueError, match="num_samples"):
        MCFisherOperator(model, data, supervised_forward, num_samples=0)
    with pytest.raises(TypeError, match="seed"):
        MCFisherOperator(model, data, supervised_forward, seed=1.5)  # type: ignore[arg-type]

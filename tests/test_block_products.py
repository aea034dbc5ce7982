"""Block products: ``matmat`` is one pass over the data and equals column-wise ``matvec``.

Oracles: the operator's own ``matvec`` column by column (exact float64; ``matvec`` is the
``b = 1`` case of the same loop, so the two agree to rounding), and counts of the calls
of the functions a user passes in (the forward and loss evaluations a block costs).
The dense float64 oracles of every operator live in its own test file and are compared
through ``matmat`` of the identity, i.e. through this same block path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
)
from hessian_eigenthings.loss_fns.base import LossOfOutput
from hessian_eigenthings.loss_fns.standard import cross_entropy_loss_of_output, supervised_forward
from hessian_eigenthings.operators.data_operator import DataCurvatureOperator
from tests.helpers import assert_unchanged, dense_hessian, rel_err, snapshot

DT = torch.float64


class Net(nn.Module):
    """Linear -> BatchNorm (eval, non-trivial running statistics) -> tanh -> Linear, plus
    a parameter that never reaches the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    model = Net().double()
    with torch.no_grad():
        for _ in range(3):  # running statistics away from (0, 1)
            model(torch.randn(16, 4, dtype=DT) * 2 + 1)
    return model.eval()


def _data(sizes: tuple[int, ...] = (5, 3, 4), seed: int = 1) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
        for n in sizes
    ]


def _ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _ce_rows(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


Build = Callable[..., DataCurvatureOperator]

OPERATORS: dict[str, Build] = {
    "hessian": lambda m, d, **kw: HessianOperator(m, d, _ce, **kw),
    "hessian_fd": lambda m, d, **kw: HessianOperator(m, d, _ce, method="finite_difference", **kw),
    "ggn": lambda m, d, **kw: GGNOperator(
        m, d, supervised_forward, cross_entropy_loss_of_output(), **kw
    ),
    "ggn_loss_autograd": lambda m, d, **kw: GGNOperator(
        m, d, supervised_forward, cross_entropy_loss_of_output(), loss_hvp="autograd", **kw
    ),
    "ggn_fd": lambda m, d, **kw: GGNOperator(
        m, d, supervised_forward, cross_entropy_loss_of_output(), jvp="finite_difference", **kw
    ),
    "empirical_fisher": lambda m, d, **kw: EmpiricalFisherOperator(m, d, _ce_rows, **kw),
    "mc_fisher": lambda m, d, **kw: MCFisherOperator(
        m, d, supervised_forward, num_samples=2, seed=3, **kw
    ),
}
# finite differences: a block and a matvec perturb along the same unit vectors, so they
# agree to rounding too; the looser bound covers the float64 rounding of h-steps.
TOL = {"hessian_fd": 1e-9, "ggn_fd": 1e-9}

VARIANTS: dict[str, dict[str, Any]] = {
    "loop": {"block_mode": "loop"},
    "vmap": {"block_mode": "vmap"},
    "chunks_of_2": {"max_block": 2},
    "vmap_chunks_of_3": {"block_mode": "vmap", "max_block": 3},
    "microbatches_filtered": {"microbatch_size": 2, "param_filter": ["fc2.*", "bn.*", "unused.*"]},
}


def _columns(op: DataCurvatureOperator, V: torch.Tensor) -> torch.Tensor:
    return torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", sorted(OPERATORS))
def test_matmat_equals_columnwise_matvec(kind: str, variant: str) -> None:
    """Ragged batches (5, 3, 4), a parameter outside the graph, eval-mode BatchNorm."""
    model = _net()
    snap = snapshot(model)
    op = OPERATORS[kind](model, _data(), **VARIANTS[variant])
    V = torch.randn(op.size, 7, generator=torch.Generator().manual_seed(2), dtype=DT)
    got = op.matmat(V)
    want = _columns(op, V)
    assert got.shape == V.shape and got.dtype == DT
    assert rel_err(got, want) <= TOL.get(kind, 1e-12)
    lo, hi = _unused_range(op)
    if hi > lo:  # the unused parameter's rows are exactly zero
        assert torch.count_nonzero(got[lo:hi]) == 0
    assert_unchanged(model, snap)


def _unused_range(op: DataCurvatureOperator) -> tuple[int, int]:
    """Entries of the vector that belong to the parameters of ``Net.unused``."""
    lo = hi = start = 0
    for name, p in op.named_params:
        if name.startswith("unused."):
            lo, hi = (start, start + p.numel()) if hi == 0 else (lo, start + p.numel())
        start += p.numel()
    return lo, hi


def test_block_of_hessian_equals_dense_oracle() -> None:
    """The block path against the dense float64 Hessian (not only against itself)."""
    model, data = _net(), _data()
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, data, _ce, names)
    V = torch.randn(H.shape[0], 5, dtype=DT)
    for mode in ("loop", "vmap"):
        op = HessianOperator(model, data, _ce, block_mode=mode)
        assert rel_err(op.matmat(V), H @ V) <= 1e-12


def test_matvec_is_the_block_of_one() -> None:
    """matvec and a one-column matmat are the same computation: bitwise equal."""
    model, data = _net(), _data()
    for kind, build in OPERATORS.items():
        op = build(model, data)
        v = torch.randn(op.size, dtype=DT)
        assert torch.equal(op.matvec(v), op.matmat(v[:, None])[:, 0]), kind


# -- counted evaluations ---------------------------------------------------------------------


class Counted:
    """A user function that counts its calls."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any) -> torch.Tensor:
        self.calls += 1
        return self.fn(*args)


def _counted_ops(**kw: Any) -> dict[str, tuple[DataCurvatureOperator, list[Counted]]]:
    """The operators with counted user functions; ``kw`` goes to the output-curvature ones."""
    model, data = _net(), _data((5, 3, 4))
    ce_out = cross_entropy_loss_of_output()
    out: dict[str, tuple[DataCurvatureOperator, list[Counted]]] = {}
    loss = Counted(_ce)
    out["hessian"] = (HessianOperator(model, data, loss), [loss])
    rows = Counted(_ce_rows)
    out["empirical_fisher"] = (EmpiricalFisherOperator(model, data, rows, **kw), [rows])
    fwd = Counted(supervised_forward)
    lo = Counted(ce_out)
    counted_loss = LossOfOutput(lo, hvp=ce_out.hvp, batch_weight=ce_out.batch_weight)
    out["ggn"] = (GGNOperator(model, data, fwd, counted_loss, **kw), [fwd, lo])
    fwd_mc = Counted(supervised_forward)
    out["mc_fisher"] = (MCFisherOperator(model, data, fwd_mc, seed=0, **kw), [fwd_mc])
    for _, fns in out.values():
        for f in fns:
            f.calls = 0  # forget the construction-time determinism probe
    return out


@pytest.mark.parametrize(("kind", "most"), [("hessian", 3), ("empirical_fisher", 3), ("ggn", 6)])
def test_block_of_16_over_3_batches_evaluates_once_per_batch(kind: str, most: int) -> None:
    """A block of 16 vectors over 3 batches: 3 loss evaluations for the Hessian and the
    empirical Fisher (one forward per batch), at most 6 forward/loss calls for the GGN;
    before block products these were 48, 96 and 96."""
    op, fns = _counted_ops()[kind]
    V = torch.randn(op.size, 16, dtype=DT)
    op.matmat(V)
    assert sum(f.calls for f in fns) <= most
    if kind != "ggn":
        assert sum(f.calls for f in fns) == 3


def test_output_curvature_products_count_their_forward_passes() -> None:
    """Over 3 batches, whatever the block's width: ``one_pass=True`` (the empirical
    Fisher's default) is one forward per batch (the tangents ride along the forward that
    records the reverse graph); ``one_pass=False`` (the GGN's and MC Fisher's default, a
    training step's memory) two."""
    defaults = {"hessian": 3, "empirical_fisher": 3, "ggn": 6, "mc_fisher": 6}
    for width in (1, 8):
        for kind, (op, fns) in _counted_ops().items():
            op.matmat(torch.randn(op.size, width, dtype=DT))
            assert sum(f.calls for f in fns) == defaults[kind], (kind, width)
        for one_pass in (True, False):
            for kind, (op, fns) in _counted_ops(one_pass=one_pass).items():
                if kind == "hessian":
                    continue
                op.matmat(torch.randn(op.size, width, dtype=DT))
                assert sum(f.calls for f in fns) == (3 if one_pass else 6), (kind, one_pass)


def test_max_block_splits_the_forward_passes() -> None:
    model, data = _net(), _data((5, 3, 4))
    loss = Counted(_ce_rows)
    op = EmpiricalFisherOperator(model, data, loss, max_block=4)
    loss.calls = 0
    op.matmat(torch.randn(op.size, 10, dtype=DT))
    assert loss.calls == 3 * 3  # chunks of 4, 4 and 2 columns per batch


# -- kept graphs -------------------------------------------------------------------------------


KEEPABLE = ("hessian", "ggn", "ggn_loss_autograd", "empirical_fisher", "mc_fisher")


@pytest.mark.parametrize("mode", ["loop", "vmap"])
@pytest.mark.parametrize("kind", KEEPABLE)
def test_kept_graphs_give_the_same_products_without_evaluating_again(kind: str, mode: str) -> None:
    model, data = _net(), _data((5, 3, 4))
    fresh = OPERATORS[kind](model, data, microbatch_size=3)
    counted = {"n": 0}

    def count_forward(module: nn.Module, args: Any, out: Any) -> None:
        counted["n"] += 1

    handle = model.register_forward_hook(count_forward)
    try:
        kept = OPERATORS[kind](model, data, microbatch_size=3, keep_graphs=True, block_mode=mode)
        V = torch.randn(kept.size, 4, dtype=DT)
        first = kept.matmat(V)
        counted["n"] = 0
        again = kept.matmat(V)
        v_again = kept.matvec(V[:, 1])
        assert counted["n"] == 0  # later products reuse the kept graphs
    finally:
        handle.remove()
    want = fresh.matmat(V)
    assert rel_err(first, want) <= 1e-12
    assert rel_err(again, want) <= 1e-12
    assert rel_err(v_again, want[:, 1]) <= 1e-12


def test_kept_graphs_refuse_a_changed_model_or_data_and_rebuild_on_release() -> None:
    model, data = _net(), _data()
    op = HessianOperator(model, data, _ce, keep_graphs=True)
    v = torch.randn(op.size, dtype=DT)
    op.matvec(v)
    with torch.no_grad():
        model.fc1.weight.add_(0.1)  # an optimizer step, in place
    with pytest.raises(RuntimeError, match=r"parameter 'fc1.weight' was modified in place"):
        op.matvec(v)
    op.release_graphs()
    rebuilt = op.matvec(v)
    assert rel_err(rebuilt, HessianOperator(model, data, _ce).matvec(v)) <= 1e-12
    model.train()
    with pytest.raises(RuntimeError, match="switched to train mode"):
        op.matvec(v)
    model.eval()
    op.matvec(v)
    with torch.no_grad():  # running statistics change without a version bump
        model.train()(data[0][0])
    model.eval()
    with pytest.raises(RuntimeError, match="buffer 'bn.running_mean' changed"):
        op.matvec(v)
    op.release_graphs()
    op.matvec(v)
    data[1][0].mul_(2.0)  # the user's batch, edited in place
    with pytest.raises(RuntimeError, match=r"batch 1 \(microbatch 0\) changed in place"):
        op.matvec(v)
    op.release_graphs()
    model.fc2.weight = nn.Parameter(model.fc2.weight.detach().clone())
    op2 = GGNOperator(
        model, data, supervised_forward, cross_entropy_loss_of_output(), keep_graphs=True
    )
    op2.matvec(v[: op2.size])
    model.fc2.weight = nn.Parameter(model.fc2.weight.detach().clone())
    with pytest.raises(RuntimeError, match="'fc2.weight' was replaced.*release_graphs"):
        op2.matvec(v[: op2.size])


def test_keep_graphs_is_refused_where_it_cannot_work() -> None:
    model, data = _net(), _data()
    with pytest.raises(ValueError, match="finite differences.*Drop keep_graphs"):
        HessianOperator(model, data, _ce, method="finite_difference", keep_graphs=True)
    with pytest.raises(ValueError, match="jvp='finite_difference'"):
        OPERATORS["ggn_fd"](model, data, keep_graphs=True)
    with pytest.raises(ValueError, match="full_dataset=False"):
        HessianOperator(model, data, _ce, full_dataset=False, keep_graphs=True)


def test_a_failing_first_product_keeps_nothing() -> None:
    model, data = _net(), _data()
    state = {"fail": True}

    def flaky(m: nn.Module, b: Any) -> torch.Tensor:
        if state["fail"] and b[0].shape[0] == 3:
            raise RuntimeError("bad batch")
        return _ce(m, b)

    op = HessianOperator(model, data, flaky, keep_graphs=True, check_determinism=False)
    v = torch.randn(op.size, dtype=DT)
    with pytest.raises(RuntimeError, match="bad batch"):
        op.matvec(v)
    state["fail"] = False
    assert rel_err(op.matvec(v), HessianOperator(model, data, _ce).matvec(v)) <= 1e-12


def test_block_options_are_checked() -> None:
    model, data = _net(), _data()
    with pytest.raises(ValueError, match="Unknown block_mode 'batched'.*'auto', 'loop', 'vmap'"):
        HessianOperator(model, data, _ce, block_mode="batched")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_block must be a positive int or None"):
            HessianOperator(model, data, _ce, max_block=bad)  # type: ignore[arg-type]
    assert HessianOperator(model, data, _ce).block_mode == "loop"  # auto on CPU


def test_to_scipy_passes_blocks_to_matmat() -> None:
    """scipy's LinearOperator hands a block (A @ X) to matmat in one call."""
    model, data = _net(), _data()
    op = HessianOperator(model, data, _ce)
    calls = {"matvec": 0, "matmat": 0}
    mv, mm = op.matvec, op.matmat

    def count_mv(v: torch.Tensor) -> torch.Tensor:
        calls["matvec"] += 1
        return mv(v)

    def count_mm(V: torch.Tensor) -> torch.Tensor:
        calls["matmat"] += 1
        return mm(V)

    op.matvec, op.matmat = count_mv, count_mm  # type: ignore[method-assign]
    lin = op.to_scipy()
    X = torch.randn(op.size, 6, dtype=DT).numpy()
    got = lin @ X
    assert calls == {"matvec": 0, "matmat": 1}
    assert (
        rel_err(
            torch.as_tensor(got), _columns(HessianOperator(model, data, _ce), torch.as_tensor(X))
        )
        <= 1e-12
    )


# -- algorithms: products in blocks ----------------------------------------------------------


def _counted_hessian() -> tuple[HessianOperator, Counted]:
    loss = Counted(_ce)
    op = HessianOperator(_net(), _data((5, 3, 4)), loss)
    loss.calls = 0
    return op, loss


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace_at_64_products_evaluates_the_loss_at_most_8_times_per_batch(method: str) -> None:
    from hessian_eigenthings import trace

    op, loss = _counted_hessian()
    res = trace(op, 64, method=method, seed=0)
    assert res.num_matvecs <= 64
    assert loss.calls <= 8 * 3  # 3 batches; one column at a time would be 3 * 64


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_diagonal_at_64_products_evaluates_the_loss_at_most_8_times_per_batch(
    method: str,
) -> None:
    from hessian_eigenthings import diagonal

    op, loss = _counted_hessian()
    diagonal(op, 64, method=method, seed=0)
    assert loss.calls <= 8 * 3


def test_spectral_density_runs_in_lockstep() -> None:
    """8 runs of 20 Lanczos steps: one block product per step for all runs."""
    from hessian_eigenthings import spectral_density

    op, loss = _counted_hessian()
    res = spectral_density(op, num_runs=8, lanczos_steps=20, seed=0)
    assert res.num_matvecs == 8 * 20
    assert loss.calls <= 25 * 3  # one run after another: 160 * 3


def test_hessian_chunks_share_the_first_backward() -> None:
    """max_block splits the batched reverse passes, not the forward: one loss call per batch."""
    model, data = _net(), _data((5, 3, 4))
    loss = Counted(_ce)
    op = HessianOperator(model, data, loss, block_mode="vmap", max_block=4)
    loss.calls = 0
    V = torch.randn(op.size, 10, dtype=DT)
    got = op.matmat(V)
    assert loss.calls == 3
    assert rel_err(got, _columns(HessianOperator(model, data, _ce), V)) <= 1e-12


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_spectral_density_in_lockstep_equals_one_run_at_a_time(mode: str) -> None:
    """The same probes and the same per-run arithmetic: the same quadrature rules, to the
    rounding in which a block's columns differ from separate matvecs (BLAS kernels round
    differently at other memory alignments; vmap batches the reverse passes)."""
    from hessian_eigenthings import spectral_density

    op = HessianOperator(_net(), _data(), _ce, block_mode=mode)
    kw: dict[str, Any] = {"num_runs": 5, "lanczos_steps": 12, "seed": 4}
    together = spectral_density(op, block_size=16, **kw)
    alone = spectral_density(op, block_size=1, **kw)
    assert together.num_matvecs == alone.num_matvecs == 60
    for a, b in zip(together.nodes, alone.nodes):
        assert a.shape == b.shape
        assert float(abs(a - b).max()) <= 1e-10 * float(abs(b).max())


def test_lanczos_multiplies_its_verification_band_in_blocks() -> None:
    """Once a verification vector joins, two pending vectors exist at every step: they are
    multiplied together (one pass over the data for two products), same results."""
    from hessian_eigenthings import LambdaOperator, lanczos

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=DT))
    A = (Q * torch.linspace(1.0, 10.0, 80, dtype=DT)) @ Q.T
    calls = {"passes": 0, "columns": 0}

    def mm(X: torch.Tensor) -> torch.Tensor:
        calls["passes"] += 1
        calls["columns"] += 1 if X.dim() == 1 else X.shape[1]
        return A @ X

    blocked = lanczos(LambdaOperator(mm, 80, dtype=DT, matmat_fn=mm), k=3, seed=1)
    alone = lanczos(LambdaOperator(lambda v: A @ v, 80, dtype=DT), k=3, seed=1)
    assert calls["columns"] == blocked.num_matvecs == alone.num_matvecs
    assert calls["passes"] < calls["columns"]
    assert torch.allclose(blocked.eigenvalues, alone.eigenvalues, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher", "mc_fisher"])
def test_two_pass_product_is_the_same_operator_with_two_calls_per_batch(kind: str) -> None:
    """one_pass=False: tangents in their own pass without graph, then the forward with
    graph; the same products, two calls of the user's function per batch and block."""
    model, data = _net(), _data((5, 3, 4))
    if kind == "ggn":
        fn = Counted(supervised_forward)
        build = lambda **kw: GGNOperator(model, data, fn, cross_entropy_loss_of_output(), **kw)  # noqa: E731
    elif kind == "empirical_fisher":
        fn = Counted(_ce_rows)
        build = lambda **kw: EmpiricalFisherOperator(model, data, fn, **kw)  # noqa: E731
    else:
        fn = Counted(supervised_forward)
        build = lambda **kw: MCFisherOperator(model, data, fn, seed=2, **kw)  # noqa: E731
    one, two = build(), build(one_pass=False)
    V = torch.randn(one.size, 16, dtype=DT)
    fn.calls = 0
    got = two.matmat(V)
    assert fn.calls == 2 * 3
    fn.calls = 0
    v = two.matvec(V[:, 0])
    assert fn.calls == 2 * 3
    assert rel_err(got, one.matmat(V)) <= 1e-12
    assert rel_err(v, one.matvec(V[:, 0])) <= 1e-12

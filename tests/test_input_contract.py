"""Properties behind the input-contract table (``tests/test_reliability.py``).

The table checks verdicts; these tests check the mechanisms: the determinism probe's
tolerance, exact power-of-two scaling of vectors, Monte-Carlo Fisher labels keyed by
sample contents, the comparison of passes and its one host read, the re-raised user
errors, the symmetry probe's cost, checkpoint writes that fail, and the host reads of a
product (unchanged: one per data-operator product, none for a ``LambdaOperator``).
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hessian_eigenthings import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LambdaOperator,
    MCFisherOperator,
    lanczos,
    trace,
)
from hessian_eigenthings.errors import CheckpointWriteError
from hessian_eigenthings.loss_fns.standard import (
    cross_entropy_loss_of_output,
    mse_loss_of_output,
    supervised_forward,
    supervised_loss,
)
from hessian_eigenthings.operators.data_operator import determinism_tolerance
from tests._host_syncs import HostSyncCounter
from tests.helpers import assert_unchanged, dense_hessian, rel_err, snapshot

DT = torch.float64


def mlp(dtype: torch.dtype = DT) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def data(n: int = 12, seed: int = 0, dtype: torch.dtype = DT) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=dtype), torch.randint(0, 2, (n,), generator=g)


def ce(m: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


X, Y = data()
BATCHES = [(X[:5], Y[:5]), (X[5:8], Y[5:8]), (X[8:], Y[8:])]


# -- the determinism probe -------------------------------------------------------------------


class Noisy(nn.Module):
    """Output times ``1 + rel * noise``: ``rel ~ 1e-7`` is reduction-order noise in float32."""

    def __init__(self, rel: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)
        self.rel = rel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y * (1 + self.rel * torch.randn_like(y))


def test_determinism_tolerance_separates_reduction_noise_from_dropout() -> None:
    assert determinism_tolerance(torch.float32) == pytest.approx(64 * 2.0**-23)
    assert determinism_tolerance(torch.float64) == pytest.approx(64 * 2.0**-52)
    assert determinism_tolerance(torch.bfloat16) == 1e-3
    xf = [(x.float(), y) for x, y in BATCHES]
    for seed in range(5):  # last-bit noise: accepted, whatever the draw
        torch.manual_seed(seed)
        HessianOperator(Noisy(1e-7), xf, ce)
    for rel in (1e-2, 1e-4):  # dropout-scale randomness without a dropout module: refused
        with pytest.raises(ValueError, match="differs between two evaluations"):
            HessianOperator(Noisy(rel), xf, ce)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.1), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"Dropout.*p=0\.1"):
        HessianOperator(model, xf, ce)


def test_determinism_probe_reports_a_non_finite_loss_as_non_finite() -> None:
    from hessian_eigenthings import NonFiniteError

    x = X.clone()
    x[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="batch index 0") as info:
        HessianOperator(mlp(), [(x, Y)], ce)
    assert info.value.batch_index == 0
    assert "differs" not in str(info.value)


# -- vectors: exact power-of-two scaling -----------------------------------------------------


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_products_scale_exactly_with_the_vector(method: str) -> None:
    """``A (2^k v) = 2^k A v`` bit for bit, also far outside the range the model computes in."""
    op = HessianOperator(
        mlp(torch.float32), [(x.float(), y) for x, y in BATCHES], ce, method=method
    )
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(1), dtype=DT)
    base = op.matvec(v)
    for k in (-1000, -140, -3, 5, 200, 900):
        assert torch.equal(op.matvec(v * 2.0**k), base * 2.0**k), k
    oracle = dense_hessian(mlp(torch.float32).double(), BATCHES, ce) @ v
    assert rel_err(op.matvec(v * 1e-42) / 1e-42, oracle) <= (1e-5 if method == "autograd" else 5e-3)


def test_a_non_finite_vector_is_blamed_not_the_model() -> None:
    from hessian_eigenthings import NonFiniteError

    op = HessianOperator(mlp(), BATCHES, ce)
    v = torch.ones(op.size, dtype=DT)
    v[4] = float("inf")
    with pytest.raises(NonFiniteError, match="index 4: the vector is to blame") as info:
        op.matvec(v)
    assert info.value.batch_index is None and info.value.param_names == ()


def test_products_run_with_autograd_inside_no_grad_and_inference_mode() -> None:
    op = HessianOperator(mlp(), BATCHES, ce)
    v = torch.randn(op.size, dtype=DT)
    want = dense_hessian(mlp(), BATCHES, ce) @ v
    with torch.no_grad():
        assert rel_err(op.matvec(v), want) <= 1e-10
    with torch.inference_mode():
        assert rel_err(op.matvec(v.clone()), want) <= 1e-10


# -- the Monte-Carlo Fisher's labels belong to the samples -----------------------------------


def test_mc_fisher_labels_do_not_depend_on_batching_order_or_microbatches() -> None:
    model = mlp()
    loaders: list[Any] = [
        [(X, Y)],
        BATCHES,
        DataLoader(TensorDataset(X, Y), batch_size=4, shuffle=True),
        lambda: iter(BATCHES[::-1]),
    ]
    V = torch.randn(26, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    ref = MCFisherOperator(model, [(X, Y)], supervised_forward, seed=4, num_samples=3).matmat(V)
    for loader in loaders:
        for mb in (None, 2):
            op = MCFisherOperator(
                model, loader, supervised_forward, seed=4, num_samples=3, microbatch_size=mb
            )
            assert rel_err(op.matmat(V), ref) <= 1e-13
            assert rel_err(op.matmat(V), ref) <= 1e-13  # a fixed operator
    other = MCFisherOperator(model, [(X, Y)], supervised_forward, seed=5, num_samples=3)
    assert rel_err(other.matmat(V), ref) > 1e-3  # the seed matters


def test_mc_fisher_labels_follow_their_distribution() -> None:
    """Label frequencies of one row over many seeds match softmax probabilities."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]], dtype=DT)

    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(logits.clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(x.shape[0], -1)

    p = torch.softmax(logits, 1)[0]
    # the product with u = e_c in output space counts how often label c was drawn:
    # M u = (1/S) sum_s r_s r_s[c], r = p - e_y; average over draws gives diag(p) - p p^T
    op = MCFisherOperator(
        Fixed(),
        [(torch.zeros(1, 1), torch.zeros(1))],
        supervised_forward,
        num_samples=20000,
        seed=0,
    )
    F_dense = op.matmat(torch.eye(4, dtype=DT))
    want = torch.diag(p) - torch.outer(p, p)
    assert (F_dense - want).abs().max() <= 4 * (0.25 / 20000) ** 0.5


# -- data that change between passes ---------------------------------------------------------


class Alternating:
    """Serves the batches in two orders, alternately (a shuffling loader, deterministically)."""

    def __init__(self) -> None:
        self.passes = 0

    def __iter__(self) -> Any:
        self.passes += 1
        return iter(BATCHES if self.passes % 2 else BATCHES[::-1])


def test_passes_are_compared_once_with_one_host_read() -> None:
    op = HessianOperator(mlp(), Alternating(), ce)
    v = torch.randn(op.size, dtype=DT)
    syncs = []
    for _ in range(4):
        with HostSyncCounter() as c:
            op.matvec(v)
        syncs.append(c.syncs)
    assert syncs == [1, 2, 1, 1], syncs  # finiteness per product, plus the pass comparison


def test_shuffled_subsets_are_refused_at_construction_and_full_passes_accepted() -> None:
    ds = TensorDataset(X, Y)
    with pytest.raises(ValueError, match="num_batches=2 takes 2 of its 3 batches"):
        HessianOperator(mlp(), DataLoader(ds, batch_size=4, shuffle=True), ce, num_batches=2)
    with pytest.raises(ValueError, match="drop_last=True drops 2 of the 12"):
        HessianOperator(mlp(), DataLoader(ds, batch_size=5, shuffle=True, drop_last=True), ce)
    # drop_last without a remainder, and full_dataset=False (stochastic by design): fine
    HessianOperator(mlp(), DataLoader(ds, batch_size=4, shuffle=True, drop_last=True), ce)
    HessianOperator(
        mlp(), DataLoader(ds, batch_size=4, shuffle=True), ce, full_dataset=False, num_batches=1
    )


# -- errors raised by user code on a batch ---------------------------------------------------


class ShardError(Exception):
    """An exception whose constructor needs two arguments."""

    def __init__(self, shard: str, line: int) -> None:
        super().__init__(f"{shard}:{line}")


def test_user_errors_name_the_batch_and_keep_type_and_cause() -> None:
    def loss(m: nn.Module, b: Any) -> torch.Tensor:
        if b[0].shape[0] == 3:
            raise KeyError("labels")
        return ce(m, b)

    model = mlp()
    op = HessianOperator(model, BATCHES, loss)
    snap = snapshot(model)
    with pytest.raises(KeyError) as info:
        op.matvec(torch.ones(op.size, dtype=DT))
    assert "batch index 1 (loader order)" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError) and info.value.__cause__.args == ("labels",)
    assert_unchanged(model, snap)

    def odd(m: nn.Module, b: Any) -> torch.Tensor:
        if b[0].shape[0] == 4:
            raise ShardError("part-3", 7)
        return ce(m, b)

    op = HessianOperator(model, BATCHES, odd)
    with pytest.raises(ShardError) as shard:
        op.matvec(torch.ones(op.size, dtype=DT))
    assert "batch index 2" in "".join(getattr(shard.value, "__notes__", []))  # type kept


# -- construction probe: no false alarms -----------------------------------------------------


def test_no_summed_loss_warning_for_means_token_counts_or_declared_sums() -> None:
    y = Y.clone()
    y[0] = -100
    batches = [(X[:6], y[:6]), (X[6:], y[6:])]
    regression = [(X[:6], torch.randn(6, 2, dtype=DT)), (X[6:], torch.randn(6, 2, dtype=DT))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HessianOperator(mlp(), batches, ce)
        HessianOperator(mlp(), batches, supervised_loss(nn.CrossEntropyLoss(ignore_index=-100)))
        HessianOperator(mlp(), batches, supervised_loss(nn.CrossEntropyLoss(reduction="sum")))
        GGNOperator(mlp(), batches, supervised_forward, cross_entropy_loss_of_output())
        GGNOperator(
            mlp(), batches, supervised_forward, cross_entropy_loss_of_output(reduction="sum")
        )
        GGNOperator(mlp(), regression, supervised_forward, mse_loss_of_output())
        EmpiricalFisherOperator(
            mlp(), batches, supervised_loss(nn.CrossEntropyLoss(reduction="none"))
        )
    with pytest.warns(UserWarning, match="weight_fn=lambda batch: 1"):
        HessianOperator(
            mlp(), BATCHES, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum")
        )


def test_graph_check_costs_one_forward_without_the_determinism_check() -> None:
    calls = [0]

    def loss(m: nn.Module, b: Any) -> torch.Tensor:
        calls[0] += 1
        return ce(m, b)

    HessianOperator(mlp(), BATCHES, loss, check_determinism=False)
    assert calls[0] == 1
    calls[0] = 0
    HessianOperator(mlp(), BATCHES, loss)
    assert calls[0] == 5  # graph, two determinism evaluations, two halves


# -- custom operators ------------------------------------------------------------------------


def test_symmetry_probe_costs_two_products_and_catches_asymmetry() -> None:
    g = torch.Generator().manual_seed(3)
    B = torch.randn(20, 20, generator=g, dtype=DT)
    S = B + B.T
    calls = [0]

    def counted(M: torch.Tensor) -> Any:
        def fn(v: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return M @ v

        return fn

    LambdaOperator(counted(S), 20, dtype=DT, check_symmetry=True)
    assert calls[0] == 2
    LambdaOperator(counted(S), 20, dtype=DT)
    assert calls[0] == 2  # off by default: no product at construction
    with pytest.raises(ValueError, match="not symmetric"):
        LambdaOperator(counted(S + 1e-3 * B), 20, dtype=DT, check_symmetry=True)


def test_lambda_output_requiring_grad_is_detached_with_one_warning() -> None:
    w = torch.ones(5, dtype=DT, requires_grad=True)
    op = LambdaOperator(lambda v: v * w, 5, dtype=DT)
    with pytest.warns(UserWarning, match="requires grad") as record:
        outs = [op.matvec(torch.ones(5, dtype=DT)) for _ in range(3)]
    assert len([r for r in record if "requires grad" in str(r.message)]) == 1
    assert not any(o.requires_grad for o in outs)


# -- host reads of a product -----------------------------------------------------------------


def test_products_read_the_host_as_before() -> None:
    """One host read per data-operator product (the total weight's check rides in the
    finiteness read, token-count weights included); none for a LambdaOperator. The input
    checks add none."""
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batches = [(x.float(), y) for x, y in BATCHES]
    ops = {
        "hessian": (HessianOperator(m, batches, ce), 1),
        "hessian_fd": (HessianOperator(m, batches, ce, method="finite_difference"), 1),
        "ggn": (GGNOperator(m, batches, supervised_forward, cross_entropy_loss_of_output()), 1),
        "ef": (
            EmpiricalFisherOperator(
                m, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")
            ),
            1,
        ),
        "mc": (MCFisherOperator(m, batches, supervised_forward, seed=0), 1),
        "lambda": (LambdaOperator(lambda v: 2 * v, 26), 0),
    }
    for name, (op, expected) in ops.items():
        v = torch.randn(op.size)
        op.matvec(v)
        with HostSyncCounter() as c:
            op.matvec(v)
            op.matmat(torch.randn(op.size, 2))
        # two products: the vector, and the block of two in one pass
        assert c.syncs == 2 * expected and c.host_to_device == 0, (name, c.events)


# -- checkpoints -----------------------------------------------------------------------------


def _op() -> LambdaOperator:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=DT))
    A = (Q * torch.linspace(0.0, 10.0, 30, dtype=DT)) @ Q.T
    return LambdaOperator(lambda v: A @ v, 30, dtype=DT)


def test_unwritable_checkpoint_is_refused_before_the_first_product(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hessian_eigenthings.algorithms.checkpoint as ck

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ck.tempfile, "mkstemp", refuse)
    calls = [0]
    op = _op()
    real = op._fn

    def counted(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return real(v)

    op._fn = counted
    path = tmp_path / "run.ckpt"
    with pytest.raises(CheckpointWriteError, match="run.ckpt.*cannot be written.*Permission") as e:
        trace(op, 40, seed=0, checkpoint=path)
    assert calls[0] == 0 and e.value.partial is None and e.value.path == str(path)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_carries_the_partial_result_and_names_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fsync
    writes = [0]

    def disk_full(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            writes[0] += 1
            if writes[0] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    path = tmp_path / "run.ckpt"
    with pytest.raises(CheckpointWriteError, match="run.ckpt' failed.*No space left") as e:
        lanczos(_op(), k=3, seed=0, tol=1e-14, checkpoint=path, checkpoint_every=4)
    partial = e.value.partial
    assert partial is not None and partial.stop_reason == "checkpoint_failed"
    assert partial.eigenvalues.shape == (3,) and not bool(partial.converged.all())
    # the previous checkpoint is intact and no temporary file is left; calling again resumes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]
    monkeypatch.setattr(os, "fsync", real)
    resumed = lanczos(_op(), k=3, seed=0, tol=1e-14, checkpoint=path, checkpoint_every=4)
    whole = lanczos(_op(), k=3, seed=0, tol=1e-14)
    assert torch.equal(resumed.eigenvalues, whole.eigenvalues)


# -- on a GPU --------------------------------------------------------------------------------


class ScatterModel(nn.Module):
    """Sums features into buckets with ``index_add_`` (atomics on CUDA: last-bit noise)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 64)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x)).reshape(-1)
        index = torch.arange(h.numel(), device=h.device) % (8 * x.shape[0])
        buckets = torch.zeros(8 * x.shape[0], device=h.device).index_add_(0, index, h)
        return self.head(buckets.reshape(x.shape[0], 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reduction_noise_passes_the_probe_and_products_do_not_sync() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4096, 3, generator=g).cuda(), torch.randint(0, 2, (4096,), generator=g).cuda())
        for _ in range(2)
    ]
    op = HessianOperator(ScatterModel().cuda(), batches, ce)  # no "loss differs"
    v = torch.randn(op.size, device="cuda")
    first, second = op.matvec(v), op.matvec(v)
    assert rel_err(first, second) <= 1e-4
    lam = LambdaOperator(lambda x: 3.0 * x, 1000, device="cuda")
    x = torch.randn(1000, device="cuda") * 1e-42
    lam.matvec(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = lam.matvec(x)  # the vector's scaling reads nothing on the host
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (out.double() - 3.0 * x.double()).abs().max() <= 2.0**-148  # one subnormal ulp

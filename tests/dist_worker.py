"""Worker for tests/test_distributed.py: one rank of a 2-process gloo job on CPU.

Run as ``python -m tests.dist_worker OUT_DIR`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set (and optionally ``HE_DIST_SCENARIOS``, a
comma-separated subset of the scenarios). Every scenario computes its numbers against an
oracle built in the same process (the single-process operator on the union of all
shards, dense float64 matrices) and records them; the test reads ``OUT_DIR/rank{r}.json``
and asserts. A scenario that raises records its error instead of aborting the job.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hessian_eigenthings import HessianOperator
from hessian_eigenthings.algorithms.hutchinson import hutchinson
from hessian_eigenthings.algorithms.lanczos import lanczos
from hessian_eigenthings.algorithms.spectral_density import spectral_density
from hessian_eigenthings.algorithms.trace import trace
from hessian_eigenthings.backends import SingleDeviceBackend, fresh_seed
from hessian_eigenthings.backends.distributed import ReplicatedBackend, ShardedBackend
from hessian_eigenthings.operators.distributed.ddp import DDPHessianOperator
from tests._gloo_worker import exit_after, run_scenarios
from tests.helpers import assert_unchanged, dense_hessian, rel_err, snapshot

# Union of 12 samples. DDP shards are uneven in size and batch count (7 and 5 samples);
# FSDP shards are uneven in size with equal batch counts (FSDP's forward is collective).
DDP_SPLITS = {0: [(0, 4), (4, 7)], 1: [(7, 12)]}
FSDP_SPLITS = {0: [(0, 4), (4, 7)], 1: [(7, 10), (10, 12)]}
FSDP_SPLITS_1 = {0: [(0, 7)], 1: [(7, 12)]}  # one batch per rank: half the passes per matvec


def ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def make_model(hidden: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return x, y


def batches(splits: list[tuple[int, int]]) -> list[Any]:
    x, y = make_data()
    return [(x[a:b], y[a:b]) for a, b in splits]


def union(split_map: dict[int, list[tuple[int, int]]]) -> list[Any]:
    return [b for r in sorted(split_map) for b in batches(split_map[r])]


def rand_vec(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class CommCounter:
    """Counts collectives twice: Python-level ``dist.all_reduce`` calls (patched) and
    every c10d collective the gloo process group runs (profiler events ``gloo:*``,
    which also sees collectives issued from C++, e.g. by DDP's reducer or FSDP)."""

    def __init__(self) -> None:
        self.python_all_reduce = 0
        self.gloo: list[dict[str, Any]] = []

    def __enter__(self) -> CommCounter:
        self._orig = dist.all_reduce

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.python_all_reduce += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counted  # type: ignore[assignment]
        # The legacy (non-kineto) profiler records the same c10d events and starts in
        # milliseconds instead of seconds.
        self._prof = torch.autograd.profiler.profile(record_shapes=True, use_kineto=False)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)
        dist.all_reduce = self._orig  # type: ignore[assignment]
        for e in self._prof.function_events:
            if e.name.startswith("gloo:"):
                shapes = e.input_shapes or [[]]
                numel = 1
                for d in shapes[0]:
                    numel *= d
                self.gloo.append({"name": e.name, "numel": numel})


def _agree(t: torch.Tensor) -> bool:
    """Whether ``t`` is bitwise identical on every rank."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(p, parts[0]) for p in parts)


def _columns(op: Any, block: torch.Tensor) -> torch.Tensor:
    """The block's products column by column (``matvec``), the oracle of ``matmat``."""
    return torch.stack([op.matvec(block[:, j]) for j in range(block.shape[1])], dim=1)


# -- scenarios -------------------------------------------------------------------------------
def ddp_hessian(rank: int, method: str, wrap: bool) -> dict[str, Any]:
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    dense = dense_hessian(model, union(DDP_SPLITS), ce, names)
    single = HessianOperator(model, union(DDP_SPLITS), ce, method=method)
    user_model: nn.Module = model
    if wrap:
        user_model = nn.parallel.DistributedDataParallel(model)
    snap = snapshot(model)
    op = DDPHessianOperator(user_model, batches(DDP_SPLITS[rank]), ce, method=method)
    v = rand_vec(op.size, 3)
    with CommCounter() as cc:
        got = op.matvec(v)
    block = torch.stack([v, rand_vec(op.size, 4), rand_vec(op.size, 5)], dim=1)
    with CommCounter() as cc_block:
        got_block = op.matmat(block)
    want = single.matvec(v)
    unchanged = True
    try:
        assert_unchanged(model, snap)
    except AssertionError:
        unchanged = False
    return {
        "size": op.size,
        "rel_vs_single": rel_err(got, want),
        "rel_vs_dense": rel_err(got, dense @ v),
        "rel_block_vs_dense": rel_err(got_block, dense @ block),
        "rel_block_vs_columns": rel_err(got_block, _columns(op, block)),
        "same_on_all_ranks": _agree(got),
        "python_all_reduce": cc.python_all_reduce,
        "gloo": cc.gloo,
        "block_width": block.shape[1],
        "block_python_all_reduce": cc_block.python_all_reduce,
        "block_gloo": cc_block.gloo,
        "model_unchanged": unchanged,
        "is_ddp_wrapped": wrap,
    }


def _ce_rows(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row Hessians of the mean CE over valid rows: (diag p - p p^T) / N_valid."""
    p = torch.softmax(out, dim=1)
    valid = (y != -100).to(out.dtype)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return h * (valid / valid.sum())[:, None, None]


def dense_ggn_ce(model: nn.Module, data: list[Any]) -> torch.Tensor:
    """Independent oracle: sum_i J_i^T H_i J_i over the union (torch.func Jacobians)."""
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda ps: torch.func.functional_call(model, ps, (x,)))(params)
    J = torch.cat([jac[n].reshape(x.shape[0], -1, params[n].numel()) for n in params], dim=2)
    out = model(x).detach()
    return torch.einsum("ica,icd,idb->ab", J, _ce_rows(out, y), J)


def dense_empirical_fisher(model: nn.Module, data: list[Any]) -> torch.Tensor:
    """Independent oracle: (1/N) G^T G with G the (N, n) per-sample gradient matrix."""
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    params = {n: p.detach() for n, p in model.named_parameters()}

    def losses(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, ps, (x,))
        return nn.functional.cross_entropy(out, y, reduction="none")

    jac = torch.func.jacrev(losses)(params)
    G = torch.cat([jac[n].reshape(x.shape[0], -1) for n in params], dim=1)
    return G.T @ G / x.shape[0]


def ddp_curvature(rank: int, kind: str) -> dict[str, Any]:
    """DDP GGN / empirical Fisher (DDP-wrapped model) vs single process and dense."""
    from hessian_eigenthings.loss_fns.standard import (
        cross_entropy_loss_of_output,
        supervised_forward,
        supervised_loss,
    )
    from hessian_eigenthings.operators.distributed.ddp import (
        DDPEmpiricalFisherOperator,
        DDPGGNOperator,
    )
    from hessian_eigenthings.operators.fisher import EmpiricalFisherOperator
    from hessian_eigenthings.operators.ggn import GGNOperator

    model = make_model()
    shard, full = batches(DDP_SPLITS[rank]), union(DDP_SPLITS)
    if kind == "ggn_tokens":  # ignored targets: weights are non-ignored counts (tensors)
        ignore = {1, 5, 6, 9}
        mask = lambda b, a: torch.tensor([a + i in ignore for i in range(len(b[1]))])  # noqa: E731
        starts = [a for a, _ in DDP_SPLITS[rank]]
        shard = [(b[0], b[1].masked_fill(mask(b, a), -100)) for b, a in zip(shard, starts)]
        all_starts = [a for r in sorted(DDP_SPLITS) for a, _ in DDP_SPLITS[r]]
        full = [(b[0], b[1].masked_fill(mask(b, a), -100)) for b, a in zip(full, all_starts)]
    ddp_model = nn.parallel.DistributedDataParallel(model)
    snap = snapshot(model)
    if kind == "fisher":
        loss = supervised_loss(nn.CrossEntropyLoss(reduction="none"))
        op: Any = DDPEmpiricalFisherOperator(ddp_model, shard, loss)
        single: Any = EmpiricalFisherOperator(model, full, loss)
        dense = dense_empirical_fisher(model, full)
    else:
        lo = cross_entropy_loss_of_output()
        op = DDPGGNOperator(ddp_model, shard, supervised_forward, lo)
        single = GGNOperator(model, full, supervised_forward, lo)
        dense = dense_ggn_ce(model, full)
    v = rand_vec(op.size, 11)
    with CommCounter() as cc:
        got = op.matvec(v)
    block = torch.stack([v, rand_vec(op.size, 12), rand_vec(op.size, 13)], dim=1)
    with CommCounter() as cc_block:
        got_block = op.matmat(block)
    unchanged = True
    try:
        assert_unchanged(model, snap)
    except AssertionError:
        unchanged = False
    return {
        "size": op.size,
        "rel_vs_single": rel_err(got, single.matvec(v)),
        "rel_vs_dense": rel_err(got, dense @ v),
        "rel_block_vs_dense": rel_err(got_block, dense @ block),
        "rel_block_vs_columns": rel_err(got_block, _columns(op, block)),
        "same_on_all_ranks": _agree(got),
        "python_all_reduce": cc.python_all_reduce,
        "gloo": cc.gloo,
        "block_width": block.shape[1],
        "block_python_all_reduce": cc_block.python_all_reduce,
        "block_gloo": cc_block.gloo,
        "model_unchanged": unchanged,
    }


def ddp_stochastic(rank: int) -> dict[str, Any]:
    """full_dataset=False: each matvec uses every rank's next batch (rank 1 cycles)."""
    model = make_model()
    op = DDPHessianOperator(model, batches(DDP_SPLITS[rank]), ce, full_dataset=False)
    v = rand_vec(op.size, 13)
    x, y = make_data()
    errs = []
    for first in ((0, 4), (4, 7), (0, 4)):  # rank 0's batch; rank 1 always holds (7, 12)
        want = HessianOperator(model, [(x[a:b], y[a:b]) for a, b in (first, (7, 12))], ce)
        errs.append(rel_err(op.matvec(v), want.matvec(v)))
    return {"rel_errs": errs}


def mismatch(rank: int, kind: str) -> dict[str, Any]:
    model = make_model(hidden=6 if (kind == "size" and rank == 1) else 5)
    if kind == "syncbn":  # train-mode SyncBatchNorm would all-gather inside the forward
        model = nn.Sequential(model[0], nn.SyncBatchNorm(5), *list(model)[1:]).double().train()
    data = [] if (kind == "empty" and rank == 1) else batches(DDP_SPLITS[rank])
    wrong = SingleDeviceBackend() if (kind == "backend" and rank == 0) else None
    try:
        DDPHessianOperator(model, data, ce, backend=wrong)
    except Exception as err:
        return {"raised": type(err).__name__, "message": str(err)}
    return {"raised": None}


def replicated_seed(rank: int) -> dict[str, Any]:
    backend = ReplicatedBackend()
    gen = backend.generator(fresh_seed(), torch.device("cpu"))
    x = backend.random(9, num=2, generator=gen, dtype=torch.float64, device=torch.device("cpu"))
    agreed = backend.all_agree(torch.tensor([float(rank)]))
    return {"probes_agree": _agree(x), "all_agree": agreed.tolist()}


def one_rank_backend(n: int, **kwargs: Any) -> ShardedBackend:
    """A ShardedBackend over a group of this rank alone: the one-rank reference."""
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # collective
    return ShardedBackend([[(0, n)]], n, groups[dist.get_rank()], **kwargs)


def sharded_backend(rank: int) -> dict[str, Any]:
    n, cpu = 37, torch.device("cpu")
    kw: dict[str, Any] = {"dtype": torch.float64, "device": cpu}
    out: dict[str, Any] = {}
    even = ShardedBackend.contiguous(n)
    one = one_rank_backend(n)
    full = one.random(n, num=3, generator=one.generator(5, cpu), **kw)
    local = even.random(n, num=3, generator=even.generator(5, cpu), **kw)
    out["probes_match_one_rank"] = bool(torch.equal(local, even.shard(full)))
    out["gather_roundtrip"] = bool(torch.equal(even.gather(local[0]), full[0]))
    out["dot_err"] = abs(float(even.dot(local[0], local[1])) - float(full[0] @ full[1]))
    out["norm_err"] = abs(float(even.norm(local[2])) - float(full[2].norm()))
    out["gram_err"] = float((even.block_gram(local, local) - full @ full.T).abs().max())
    out["block_dot_err"] = float((even.block_dot(local, local[1]) - full @ full[1]).abs().max())
    # Chunked draws: two ranks with interleaved ranges vs one rank holding everything.
    split = ShardedBackend([[(0, 5), (20, 30)], [(5, 20), (30, n)]], n, chunk_size=8)
    alone = ShardedBackend([[(0, n)], []], n, chunk_size=8)
    a = split.random(n, num=2, generator=split.generator(6, cpu), distribution="rademacher", **kw)
    b = alone.random(n, num=2, generator=alone.generator(6, cpu), distribution="rademacher", **kw)
    gathered = torch.stack([split.gather(a[i]) for i in range(2)])
    whole = torch.stack([alone.gather(b[i]) for i in range(2)])
    out["chunked_world_size_independent"] = bool(torch.equal(gathered, whole))
    out["rademacher"] = bool(torch.all(gathered.abs() == 1))
    # Work per rank: only the seeded chunks holding its entries are drawn.
    big, chunk = 20_000, 256
    two = ShardedBackend.contiguous(big)
    two.chunk_size = chunk
    drawn: list[int] = []
    import hessian_eigenthings.backends.distributed as distributed_module

    original = distributed_module.draw_probes

    def counted(shape: tuple[int, ...], **kwargs: Any) -> torch.Tensor:
        drawn.append(int(np.prod(shape)))
        return original(shape, **kwargs)

    distributed_module.draw_probes = counted  # type: ignore[assignment]
    try:
        mine = two.probes(big, 2, generator=two.generator(7, cpu), **kw)
    finally:
        distributed_module.draw_probes = original  # type: ignore[assignment]
    ref = one_rank_backend(big, chunk_size=chunk)
    whole_probes = ref.probes(big, 2, generator=ref.generator(7, cpu), **kw)
    out["big_probes_match_one_rank"] = bool(torch.equal(mine, two.shard(whole_probes.T).T))
    out["drawn_per_probe"] = sum(drawn) / 2
    out["local_size"] = two.local_size(big)
    out["big_size"] = big
    out["chunk"] = chunk
    out["ranges"] = len(two.ranges)
    out["gaussian_moments"] = [float(whole_probes.mean()), float(whole_probes.var())]
    return out


def _fsdp_setup(
    rank: int, splits: dict[int, list[tuple[int, int]]] = FSDP_SPLITS, **kwargs: Any
) -> tuple[Any, HessianOperator]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hessian_eigenthings.operators.distributed.sharded import ShardedHessianOperator

    ref_model = make_model()
    model = copy.deepcopy(ref_model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    op = ShardedHessianOperator(model, batches(splits[rank]), ce, **kwargs)
    return op, HessianOperator(ref_model, union(splits), ce)


def fsdp_sharded(rank: int, uneven: bool = False) -> dict[str, Any]:
    """Gathered FSDP matvec vs the unsharded operator. ``uneven``: 2 batches vs 1 and
    microbatches of 3 (3 passes vs 2), so ranks run out of data at different times."""
    splits = DDP_SPLITS if uneven else FSDP_SPLITS
    op, single = _fsdp_setup(rank, splits, microbatch_size=3 if uneven else None)
    model, ref_model = op.model, single.model
    before = [p.to_local().clone() for p in model.parameters()]
    names = [n for n, _ in ref_model.named_parameters()]
    dense = dense_hessian(ref_model, union(splits), ce, names)
    v = rand_vec(op.size, 7)
    with CommCounter() as cc:
        local = op.matvec(op.backend.shard(v))
    got = op.backend.gather(local)
    block = torch.stack([v, rand_vec(op.size, 8), rand_vec(op.size, 9)], dim=1)
    local_block = torch.stack([op.backend.shard(block[:, j]) for j in range(3)], dim=1)
    with CommCounter() as cc_block:
        got_local_block = op.matmat(local_block)
    got_block = torch.stack([op.backend.gather(got_local_block[:, j]) for j in range(3)], dim=1)
    after = [p.to_local() for p in model.parameters()]
    return {
        "size": op.size,
        "local_size": op.local_size,
        "rel_vs_single": rel_err(got, single.matvec(v)),
        "rel_vs_dense": rel_err(got, dense @ v),
        "rel_block_vs_dense": rel_err(got_block, dense @ block),
        "rel_block_col0_vs_matvec": rel_err(got_block[:, 0], got),
        "same_on_all_ranks": _agree(got),
        "params_unchanged": all(torch.equal(x, y) for x, y in zip(before, after)),
        "gloo": cc.gloo,
        "python_all_reduce": cc.python_all_reduce,
        "block_gloo": cc_block.gloo,
        "block_python_all_reduce": cc_block.python_all_reduce,
    }


def fsdp_nonfinite(rank: int, poison: str) -> dict[str, Any]:
    """A loss that goes non-finite on one batch of one rank, on 1 or 2 ranks.

    ``poison="nan"``: the loss times NaN on the batch of 2 samples (the last one: batch 1
    of rank 1 on two ranks, batch 3 on one), so every gradient block goes NaN.
    ``"inf_bias"``: that batch's loss plus ``inf * ||2.bias||^2``, so only the block of
    ``2.bias`` does (its rows live on both ranks). Afterwards the operator must still
    compute the clean product (no rank left behind in a collective).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hessian_eigenthings.errors import NonFiniteError
    from hessian_eigenthings.operators.distributed.sharded import ShardedHessianOperator

    world = dist.get_world_size()
    splits = FSDP_SPLITS if world == 2 else {0: FSDP_SPLITS[0] + FSDP_SPLITS[1]}
    state = {"on": False}

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        out = ce(model, batch)
        if not (state["on"] and batch[0].shape[0] == 2):
            return out
        if poison == "nan":
            return out * float("nan")
        return out + float("inf") * (model[2].bias ** 2).sum()

    ref_model = make_model()
    model = copy.deepcopy(ref_model)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    op = ShardedHessianOperator(model, batches(splits[rank]), loss)
    before = [p.to_local().clone() for p in model.parameters()]
    v = op.backend.shard(rand_vec(op.size, 9))
    state["on"] = True
    out: dict[str, Any] = {"raised": None}
    try:
        op.matvec(v)
    except NonFiniteError as err:
        out.update(
            raised="NonFiniteError",
            message=str(err),
            batch_index=err.batch_index,
            param_names=list(err.param_names),
        )
    out["params_unchanged"] = all(
        torch.equal(x, p.to_local()) for x, p in zip(before, model.parameters())
    )
    state["on"] = False
    clean = op.backend.gather(op.matvec(v))
    single = HessianOperator(ref_model, union(splits), ce)
    out["clean_rel_vs_single"] = rel_err(clean, single.matvec(rand_vec(op.size, 9)))
    return out


def sharded_algorithms(rank: int) -> dict[str, Any]:
    """SLQ and Hutchinson run unchanged on the shards; same numbers on every rank."""
    op, single = _fsdp_setup(rank, FSDP_SPLITS_1)
    alone = one_rank_backend(single.size)  # the same probes as any number of ranks
    sd = spectral_density(op, num_runs=2, lanczos_steps=8, seed=3)
    sd_ref = spectral_density(single, num_runs=2, lanczos_steps=8, seed=3, backend=alone)
    nodes, ref_nodes = np.concatenate(sd.nodes), np.concatenate(sd_ref.nodes)
    tr = hutchinson(op, 4, seed=2, block_size=2)
    tr_ref = hutchinson(single, 4, seed=2, block_size=2, backend=alone)
    fresh = spectral_density(op, num_runs=1, lanczos_steps=4, seed=None)
    return {
        "slq_nodes_err": float(np.abs(nodes - ref_nodes).max() / np.abs(ref_nodes).max()),
        "slq_same_on_all_ranks": _agree(torch.from_numpy(np.concatenate([nodes, sd.density]))),
        "slq_integral": float(sd.integral()),
        "hutchinson_rel": abs(tr.estimate - tr_ref.estimate) / abs(tr_ref.estimate),
        "hutchinson_same_on_all_ranks": _agree(torch.tensor([tr.estimate, tr.stderr])),
        "fresh_seed_same_on_all_ranks": _agree(torch.from_numpy(np.concatenate(fresh.nodes))),
    }


def ddp_algorithms(rank: int) -> dict[str, Any]:
    """Hutch++ trace and SLQ on the DDP operator equal the single-process ones."""
    model = make_model()
    op = DDPHessianOperator(model, batches(DDP_SPLITS[rank]), ce)
    single = HessianOperator(model, union(DDP_SPLITS), ce)
    tr = trace(op, 12, seed=4)
    tr_ref = trace(single, 12, seed=4)
    sd = spectral_density(op, num_runs=2, lanczos_steps=10, seed=5)
    sd_ref = spectral_density(single, num_runs=2, lanczos_steps=10, seed=5)
    nodes, ref_nodes = np.concatenate(sd.nodes), np.concatenate(sd_ref.nodes)
    fresh = trace(op, 8, seed=None)
    return {
        "trace_rel": abs(tr.estimate - tr_ref.estimate) / abs(tr_ref.estimate),
        "slq_nodes_err": float(np.abs(nodes - ref_nodes).max() / np.abs(ref_nodes).max()),
        "fresh_seed_same_on_all_ranks": _agree(torch.tensor([fresh.estimate, fresh.stderr])),
    }


def lanczos_scenario(rank: int, which: str) -> dict[str, Any]:
    """Top-4 eigenpairs on the DDP / FSDP operator vs single process and numpy eigh."""

    if which == "ddp":
        model = make_model()
        op: Any = DDPHessianOperator(
            nn.parallel.DistributedDataParallel(model), batches(DDP_SPLITS[rank]), ce
        )
        data = union(DDP_SPLITS)
    else:
        op, _ = _fsdp_setup(rank, FSDP_SPLITS_1)
        model, data = make_model(), union(FSDP_SPLITS_1)
    single = HessianOperator(model, data, ce)
    dense = dense_hessian(model, data, ce, [n for n, _ in model.named_parameters()])
    exact = np.linalg.eigvalsh(dense.numpy())
    exact = exact[np.argsort(-np.abs(exact))]
    k = 4 if which == "ddp" else 2  # FSDP matvecs are 4 collective forward/backward passes
    res = lanczos(op, k=k, seed=0)
    ref = lanczos(single, k=k, seed=0)
    vals = res.eigenvalues.double()
    vecs = res.eigenvectors if which == "ddp" else None
    if vecs is None:  # sharded: gather every eigenvector's shards
        vecs = torch.stack([op.backend.gather(res.eigenvectors[i]) for i in range(k)])
    resid = (vecs @ dense - vals[:, None] * vecs).norm(dim=1) / vals.abs()
    out = {
        "eig_vs_single": float((vals - ref.eigenvalues).abs().max() / ref.eigenvalues.abs().max()),
        "eig_vs_numpy": float(np.abs(vals.numpy() - exact[:k]).max() / np.abs(exact).max()),
        "max_residual_vs_dense": float(resid.max()),
        "converged": bool(torch.as_tensor(res.converged).all()),
        "same_on_all_ranks": _agree(vals),
    }
    if which == "ddp":  # seed=None (the sharded operator's is covered by sharded_algorithms)
        out["fresh_seed_same_on_all_ranks"] = _agree(lanczos(op, k=2, seed=None).eigenvalues)
    return out


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "ddp_hessian_autograd": lambda r: ddp_hessian(r, "autograd", wrap=False),
    "ddp_hessian_fd": lambda r: ddp_hessian(r, "finite_difference", wrap=False),
    "ddp_hessian_wrapped": lambda r: ddp_hessian(r, "autograd", wrap=True),
    "ddp_ggn": lambda r: ddp_curvature(r, "ggn"),
    "ddp_ggn_tokens": lambda r: ddp_curvature(r, "ggn_tokens"),
    "ddp_fisher": lambda r: ddp_curvature(r, "fisher"),
    "mismatch_size": lambda r: mismatch(r, "size"),
    "mismatch_empty": lambda r: mismatch(r, "empty"),
    "mismatch_backend": lambda r: mismatch(r, "backend"),
    "mismatch_syncbn": lambda r: mismatch(r, "syncbn"),
    "ddp_stochastic": ddp_stochastic,
    "replicated_seed": replicated_seed,
    "sharded_backend": sharded_backend,
    "fsdp_sharded": fsdp_sharded,
    "fsdp_sharded_uneven": lambda r: fsdp_sharded(r, uneven=True),
    "sharded_algorithms": sharded_algorithms,
    "ddp_lanczos": lambda r: lanczos_scenario(r, "ddp"),
    "fsdp_lanczos": lambda r: lanczos_scenario(r, "fsdp"),
    "ddp_algorithms": ddp_algorithms,
    "fsdp_nonfinite_nan": lambda r: fsdp_nonfinite(r, "nan"),
    "fsdp_nonfinite_inf_bias": lambda r: fsdp_nonfinite(r, "inf_bias"),
}


def main(out_dir: str) -> None:
    run_scenarios(out_dir, SCENARIOS, select_env="HE_DIST_SCENARIOS")


if __name__ == "__main__":
    exit_after(main)

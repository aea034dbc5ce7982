"""Worker for tests/test_distributed_accel.py: one rank of a gloo job on CPU.

Scenarios of the FSDP2 operator that concern accelerator-scale costs and precision:
mixed precision (float32 shards computing in bfloat16), what a product allocates, its
host reads, and pieces whose every target is ignored. Run as
``python -m tests.dist_accel_worker OUT_DIR`` with the usual ``RANK``/``WORLD_SIZE``/
``MASTER_*`` variables; each rank writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hessian_eigenthings import HessianOperator
from hessian_eigenthings.operators import _finite_difference
from tests._gloo_worker import exit_after, run_scenarios
from tests._host_syncs import HostSyncCounter
from tests.dist_worker import FSDP_SPLITS, _agree, batches, ce, make_model, rand_vec
from tests.helpers import rel_err


def _fsdp(model: nn.Module, **kwargs: Any) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model[0], mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def _sharded(model: nn.Module, data: list[Any], loss: Any, **kwargs: Any) -> Any:
    from hessian_eigenthings.operators.distributed.sharded import ShardedHessianOperator

    return ShardedHessianOperator(model, data, loss, **kwargs)


class _Allocations(TorchDispatchMode):
    """Records ``(op, dtype, numel)`` of every fresh tensor an op returns.

    Fresh: its storage is none of the op's inputs' (views and in-place results are not
    allocations).
    """

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        inputs = {_storage(t) for t in tree_leaves((args, kwargs))}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _storage(t) not in inputs:
                self.outputs.append((func.overloadpacket.__name__, str(t.dtype), t.numel()))
        return out


def _storage(t: Any) -> int | None:
    """Address of a plain tensor's storage (``None``: not a tensor, or a wrapper subclass)."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return int(t.untyped_storage().data_ptr())
    except RuntimeError:
        return id(t)


def mixed_precision(rank: int) -> dict[str, Any]:
    """float32 shards, bfloat16 compute: the product vs the bf16-computed model in float64."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    ref = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    torch.manual_seed(0)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    shards = {0: [(x[:12], y[:12])], 1: [(x[12:], y[12:])]}
    model = _fsdp(copy.deepcopy(ref), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    op = _sharded(model, shards[rank], ce)
    # the oracle: bf16-rounded parameters and inputs, exact (float64) arithmetic
    oracle_model = copy.deepcopy(ref).double()
    with torch.no_grad():
        for p in oracle_model.parameters():
            p.copy_(p.to(torch.bfloat16).double())
    oracle = HessianOperator(
        oracle_model, [(x.to(torch.bfloat16).double(), y)], ce, check_determinism=False
    )
    errs = []
    for seed in range(4):
        v = rand_vec(op.size, seed).float()
        got = op.backend.gather(op.matvec(op.backend.shard(v))).double()
        want = oracle.matvec(v.double())
        errs.append(float((got - want).norm() / want.norm()))
    refused = ""
    try:
        _sharded(
            _fsdp(copy.deepcopy(ref), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)),
            shards[rank],
            ce,
            fd_eps=4.9e-3,
        )
    except ValueError as err:
        refused = str(err)
    return {"fd_eps": op.fd_eps, "max_rel_err": max(errs), "refused": refused}


def allocations(rank: int) -> dict[str, Any]:
    """What one product allocates: no float64 copies of shards, no concatenation, one copy."""
    ref = make_model(hidden=64).float()
    model = _fsdp(copy.deepcopy(ref))
    data = [(x.float(), y) for x, y in batches(FSDP_SPLITS[rank])]
    op = _sharded(model, data, ce)
    v = op.backend.shard(rand_vec(op.size, 3)).float()
    op.matvec(v)  # warm-up
    original = getattr(_finite_difference, "_NORM_CHUNK", None)
    _finite_difference._NORM_CHUNK = 16  # type: ignore[attr-defined]  # at most 16 upcast at once
    try:
        with _Allocations() as rec:
            op.matvec(v)
    finally:
        _finite_difference._NORM_CHUNK = original  # type: ignore[attr-defined]
    shards = [p.to_local().numel() for p in op.params]
    return {
        "local_size": op.local_size,
        "float64_big": [o for o in rec.outputs if o[1] == "torch.float64" and o[2] > 64],
        "flat_buffers": [
            o[0]
            for o in rec.outputs
            if o[2] == op.local_size
            and o[0] in ("zeros", "empty", "cat", "clone", "_to_copy", "sub", "add")
        ],
        "cat": [o for o in rec.outputs if o[0] == "cat"],
        "clones": [o for o in rec.outputs if o[0] == "clone" and o[2] in shards],
        "pieces": len(FSDP_SPLITS[rank]),
        "params": len(shards),
    }


def host_reads(rank: int) -> dict[str, Any]:
    """Host reads of one product: one per microbatch round, plus the final verdict."""
    ref = make_model()
    model = _fsdp(copy.deepcopy(ref))
    op = _sharded(model, batches(FSDP_SPLITS[rank]), _token_ce, microbatch_size=2)
    v = op.backend.shard(rand_vec(op.size, 4))
    op.matvec(v)
    with HostSyncCounter() as c:
        op.matvec(v)
    pieces = sum(-(-(b - a) // 2) for a, b in FSDP_SPLITS[rank])
    rounds = max(sum(-(-(b - a) // 2) for a, b in s) for s in FSDP_SPLITS.values()) + 1
    return {"syncs": c.syncs, "events": c.events, "pieces": pieces, "rounds": rounds}


def _token_ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], ignore_index=-100)


_token_ce.batch_weight = lambda batch: (batch[1] != -100).sum()  # type: ignore[attr-defined]


def ignored_pieces(rank: int) -> dict[str, Any]:
    """A rank whose later batch has every target ignored (a NaN loss): skipped exactly."""
    splits = {0: [(0, 4), (4, 7)], 1: [(7, 10), (10, 12)]}
    ignored = {4, 5, 6, 10, 11}  # batch 1 of rank 0 and batch 1 of rank 1: all ignored

    def shard(r: int) -> list[Any]:
        out = []
        for (a, _), (x, y) in zip(splits[r], batches(splits[r])):
            mask = torch.tensor([a + i in ignored for i in range(len(y))])
            out.append((x, y.masked_fill(mask, -100)))
        return out

    ref = make_model()
    model = _fsdp(copy.deepcopy(ref))
    op = _sharded(model, shard(rank), _token_ce)
    single = HessianOperator(ref, shard(0) + shard(1), _token_ce)
    v = rand_vec(op.size, 5)
    got = op.backend.gather(op.matvec(op.backend.shard(v)))
    return {"rel_vs_single": rel_err(got, single.matvec(v)), "same": _agree(got)}


def cuda_probes(rank: int) -> dict[str, Any]:
    """Counter-based probes of CUDA vectors: rank-count independent, no host sync."""
    if not torch.cuda.is_available():
        return {"skipped": True}
    from hessian_eigenthings.backends.distributed import ShardedBackend
    from tests.dist_worker import one_rank_backend

    cuda = torch.device("cuda", 0)
    n = 5000
    two = ShardedBackend.contiguous(n)
    two.chunk_size = 512
    gen = two.generator(9, cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mine = two.probes(n, 2, generator=gen, dtype=torch.float32, device=cuda)
        synced = False
    except RuntimeError:
        synced = True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = one_rank_backend(n, chunk_size=512)
    whole = ref.probes(n, 2, generator=ref.generator(9, cuda), dtype=torch.float32, device=cuda)
    return {
        "skipped": False,
        "synced": synced,
        "match": (not synced) and bool(torch.equal(mine, two.shard(whole.T).T)),
    }


SCENARIOS = {
    "mixed_precision": mixed_precision,
    "allocations": allocations,
    "host_reads": host_reads,
    "ignored_pieces": ignored_pieces,
    "cuda_probes": cuda_probes,
}


def main(out_dir: str) -> None:
    run_scenarios(out_dir, SCENARIOS, select_env="HE_ACCEL_SCENARIOS")


if __name__ == "__main__":
    exit_after(main)

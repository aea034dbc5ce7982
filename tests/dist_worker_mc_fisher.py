"""Worker for tests/test_distributed_mc_fisher.py: one rank of a 2-process gloo job.

Run as ``python -m tests.dist_worker_mc_fisher OUT_DIR`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. The DDP Monte-Carlo Fisher on uneven shards is
compared with the single-process operator on the union of the shards (same seed: the
same sampled labels), its collectives are counted, and the numbers are written to
``OUT_DIR/rank{r}.json``. The shared data and helpers come from tests/dist_worker.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hessian_eigenthings import MCFisherOperator, supervised_forward
from hessian_eigenthings.operators.distributed.ddp import DDPMCFisherOperator
from tests._gloo_worker import exit_after, run_scenarios
from tests.dist_worker import (
    DDP_SPLITS,
    CommCounter,
    _agree,
    batches,
    make_model,
    rand_vec,
    union,
)
from tests.helpers import assert_unchanged, rel_err, snapshot


def mc_fisher(
    rank: int, likelihood: str, seed: int | None, microbatch: int | None
) -> dict[str, Any]:
    model = make_model()
    shard, full = batches(DDP_SPLITS[rank]), union(DDP_SPLITS)
    if likelihood == "gaussian":  # regression targets are not used: labels are sampled
        shard = [(x, y.double()) for x, y in shard]
        full = [(x, y.double()) for x, y in full]
    kw: dict[str, Any] = {"likelihood": likelihood, "num_samples": 3, "microbatch_size": microbatch}
    snap = snapshot(model)
    op = DDPMCFisherOperator(
        nn.parallel.DistributedDataParallel(model), shard, supervised_forward, seed=seed, **kw
    )
    single = MCFisherOperator(model, full, supervised_forward, seed=op.seed, **kw)
    other_seed = MCFisherOperator(model, full, supervised_forward, seed=op.seed + 1, **kw)
    v = rand_vec(op.size, 21)
    with CommCounter() as cc:
        got = op.matvec(v)
    want = single.matvec(v)
    block = torch.stack([v, rand_vec(op.size, 22)], dim=1)
    unchanged = True
    try:
        assert_unchanged(model, snap)
    except AssertionError:
        unchanged = False
    return {
        "size": op.size,
        "seed": op.seed,
        "rel_vs_single": rel_err(got, want),
        "rel_block_vs_single": rel_err(op.matmat(block), single.matmat(block)),
        "rel_repeat": rel_err(op.matvec(v), got),
        "rel_other_seed": rel_err(other_seed.matvec(v), want),
        "same_on_all_ranks": _agree(got),
        "seed_same_on_all_ranks": _agree(torch.tensor([op.seed])),
        "python_all_reduce": cc.python_all_reduce,
        "gloo": cc.gloo,
        "model_unchanged": unchanged,
    }


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "categorical": lambda r: mc_fisher(r, "categorical", 7, None),
    "categorical_fresh_seed_microbatches": lambda r: mc_fisher(r, "categorical", None, 2),
    "gaussian": lambda r: mc_fisher(r, "gaussian", 3, None),
}


def main(out_dir: str) -> None:
    run_scenarios(out_dir, SCENARIOS)


if __name__ == "__main__":
    exit_after(main)

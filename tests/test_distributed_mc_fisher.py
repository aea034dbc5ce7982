"""The DDP Monte-Carlo Fisher on 2 gloo ranks (CPU) equals the single-process operator.

One job of two processes (tests/dist_worker_mc_fisher.py) runs every scenario; each test
asserts one property. Shards are uneven (7 samples in 2 batches on rank 0, 5 in 1 on rank
1); the oracle is the single-process MCFisherOperator on the union with the same seed,
which draws the same labels for every (global batch, microbatch).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch.distributed as dist

from tests._gloo_job import run_gloo_job
from tests.test_distributed import TIMEOUT_S, WORLD, _scenario

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]

NAMES = ["categorical", "categorical_fresh_seed_microbatches", "gaussian"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist_mc_fisher")
    return run_gloo_job("tests.dist_worker_mc_fisher", out, WORLD, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_mc_fisher_equals_single_process_on_union(
    results: list[dict[str, Any]], name: str
) -> None:
    per_rank = _scenario(results, name)
    for res in per_rank:
        assert res["rel_vs_single"] <= 1e-12
        assert res["rel_block_vs_single"] <= 1e-12
        assert res["rel_repeat"] <= 1e-14  # a fixed matrix: the same labels every product
        assert res["rel_other_seed"] > 1e-3  # the check discriminates: other labels differ
        assert res["same_on_all_ranks"] and res["seed_same_on_all_ranks"]
        assert res["model_unchanged"]


@pytest.mark.parametrize("name", NAMES)
def test_ddp_mc_fisher_matvec_is_one_all_reduce_of_size_plus_one(
    results: list[dict[str, Any]], name: str
) -> None:
    for res in _scenario(results, name):
        assert res["python_all_reduce"] == 1
        assert [(c["name"], c["numel"]) for c in res["gloo"]] == [
            ("gloo:all_reduce", res["size"] + 1)
        ]

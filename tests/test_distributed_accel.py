"""The FSDP2 operator at accelerator scale, on 2 gloo ranks (CPU analogues).

``tests/dist_accel_worker.py`` runs each scenario on both ranks and records numbers:

* mixed precision: float32 shards computing in bfloat16 (``MixedPrecisionPolicy``) get the
  bfloat16 finite-difference step (before: the float32 step, 222% error on this model);
* allocations of one product: no float64 copies of shards or gradients, no
  concatenation, one flat buffer per piece and one saved copy of each shard per piece
  (before: float64 copies of every gradient and of the vector, a ``cat`` per piece and a
  second saved copy of the shards);
* host reads: one per lock-step round (before: 12 on this job for 5 rounds);
* pieces whose every target is ignored are skipped exactly (their count is read with the
  round, not separately).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests._gloo_job import run_gloo_job

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]

WORLD = 2
TIMEOUT_S = 240
BF16_FD_BOUND = 2 * float(torch.finfo(torch.bfloat16).eps) ** (2 / 3)  # see test_mixed_precision_fd


def _run_job(out: Path, scenarios: str) -> list[dict[str, Any]]:
    """Run ``tests/dist_accel_worker.py`` on 2 gloo ranks; a hang fails the tests."""
    return run_gloo_job(
        "tests.dist_accel_worker",
        out,
        WORLD,
        timeout_s=TIMEOUT_S,
        env={"HE_ACCEL_SCENARIOS": scenarios},
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run_job(
        tmp_path_factory.mktemp("dist_accel"),
        "mixed_precision,allocations,host_reads,ignored_pieces",
    )


@pytest.fixture(scope="module")
def cuda_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run_job(tmp_path_factory.mktemp("dist_accel_cuda"), "cuda_probes")


def _scenario(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    per_rank = [r[name] for r in results]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank} failed in {name}:\n{res.get('error')}"
    return per_rank


def test_fsdp2_mixed_precision_uses_the_bf16_step(results: list[dict[str, Any]]) -> None:
    for res in _scenario(results, "mixed_precision"):
        assert res["fd_eps"] == pytest.approx(float(torch.finfo(torch.bfloat16).eps) ** (1 / 3))
        assert res["max_rel_err"] <= BF16_FD_BOUND
        assert "below the resolution of torch.bfloat16" in res["refused"]


def test_fsdp2_product_allocates_no_float64_copies_and_no_concatenation(
    results: list[dict[str, Any]],
) -> None:
    for res in _scenario(results, "allocations"):
        assert res["float64_big"] == []
        assert res["cat"] == []
        assert res["flat_buffers"] == ["zeros"] * res["pieces"]
        # the one copy finite differences need (to restore the shards exactly), per pass
        assert len(res["clones"]) == res["pieces"] * res["params"]


def test_fsdp2_product_reads_the_host_once_per_round(results: list[dict[str, Any]]) -> None:
    for res in _scenario(results, "host_reads"):
        assert res["syncs"] == res["rounds"], res["events"]


def test_fsdp2_all_ignored_pieces_are_skipped_exactly(results: list[dict[str, Any]]) -> None:
    for res in _scenario(results, "ignored_pieces"):
        assert res["rel_vs_single"] <= 1e-6
        assert res["same"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sharded_probes_draw_without_host_sync(
    cuda_results: list[dict[str, Any]],
) -> None:
    for res in _scenario(cuda_results, "cuda_probes"):
        assert not res["skipped"]
        assert not res["synced"]
        assert res["match"]

"""Distributed operators and backends on 2 gloo ranks (CPU), spawned inside pytest.

One job of two processes (``tests/dist_worker.py``) runs every scenario once and writes
its numbers, and a one-process job runs the FSDP2 non-finite scenarios again; each test
below asserts one property. The job has a hard timeout, so a
hang (a collective issued on one rank only) fails the tests instead of blocking CI.

Oracles: the single-process operator on the union of all shards, and the dense float64
Hessian of the sample-weighted mean loss (``tests/helpers.dense_hessian``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from tests._gloo_job import run_gloo_job

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]

WORLD = 2
TIMEOUT_S = 150


def _run_job(out: Path, world: int, scenarios: str = "") -> list[dict[str, Any]]:
    """Run ``tests/dist_worker.py`` on ``world`` gloo ranks; a hang fails the tests."""
    return run_gloo_job(
        "tests.dist_worker", out, world, timeout_s=TIMEOUT_S, env={"HE_DIST_SCENARIOS": scenarios}
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run_job(tmp_path_factory.mktemp("dist"), WORLD)


@pytest.fixture(scope="module")
def results_one_rank(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The FSDP2 non-finite scenarios in a one-process gloo job."""
    return _run_job(
        tmp_path_factory.mktemp("dist1"), 1, "fsdp_nonfinite_nan,fsdp_nonfinite_inf_bias"
    )


def _scenario(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    per_rank = [r[name] for r in results]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank} failed in {name}:\n{res.get('error')}"
    return per_rank


@pytest.mark.parametrize(
    ("name", "tol_single", "tol_dense"),
    [
        ("ddp_hessian_autograd", 1e-10, 1e-10),
        ("ddp_hessian_fd", 1e-10, 1e-6),
        ("ddp_hessian_wrapped", 1e-10, 1e-10),
        ("ddp_ggn", 1e-10, 1e-10),
        ("ddp_ggn_tokens", 1e-10, 1e-10),
        ("ddp_fisher", 1e-10, 1e-10),
    ],
)
def test_ddp_operator_equals_single_process_on_union(
    results: list[dict[str, Any]], name: str, tol_single: float, tol_dense: float
) -> None:
    """Uneven shards (7 samples in 2 batches vs 5 in 1): exact sample weighting.

    GGN and Fisher run on a DistributedDataParallel-wrapped model; ``ddp_ggn_tokens``
    ignores 4 of the 12 targets, so batches are weighted by non-ignored counts.
    """
    for res in _scenario(results, name):
        assert res["rel_vs_single"] <= tol_single
        assert res["rel_vs_dense"] <= tol_dense
        assert res["rel_block_vs_dense"] <= tol_dense
        assert res["same_on_all_ranks"]
        assert res["model_unchanged"]


@pytest.mark.parametrize(
    "name",
    [
        "ddp_hessian_autograd",
        "ddp_hessian_fd",
        "ddp_hessian_wrapped",
        "ddp_ggn",
        "ddp_ggn_tokens",
        "ddp_fisher",
    ],
)
def test_ddp_matvec_is_one_all_reduce_of_size_plus_one(
    results: list[dict[str, Any]], name: str
) -> None:
    """Exactly one collective per matvec (also with DDP's reducer around): [H v, weight]."""
    for res in _scenario(results, name):
        assert res["python_all_reduce"] == 1
        assert [(c["name"], c["numel"]) for c in res["gloo"]] == [
            ("gloo:all_reduce", res["size"] + 1)
        ]


@pytest.mark.parametrize(
    "name",
    [
        "ddp_hessian_autograd",
        "ddp_hessian_fd",
        "ddp_hessian_wrapped",
        "ddp_ggn",
        "ddp_ggn_tokens",
        "ddp_fisher",
    ],
)
def test_ddp_block_is_one_all_reduce_of_block_plus_one(
    results: list[dict[str, Any]], name: str
) -> None:
    """A block of b vectors is one pass and ONE collective: [H V (b * size), weight];
    its columns equal the column-by-column matvecs."""
    for res in _scenario(results, name):
        assert res["block_python_all_reduce"] == 1
        assert [(c["name"], c["numel"]) for c in res["block_gloo"]] == [
            ("gloo:all_reduce", res["block_width"] * res["size"] + 1)
        ]
        assert res["rel_block_vs_columns"] <= 1e-12


def test_mismatched_sizes_raise_on_every_rank(results: list[dict[str, Any]]) -> None:
    for res in _scenario(results, "mismatch_size"):
        assert res["raised"] == "ValueError"
        assert "disagree on the operator's size" in res["message"]
        assert "rank 0: 43, rank 1: 51" in res["message"]


def test_failure_on_one_rank_raises_on_every_rank(results: list[dict[str, Any]]) -> None:
    r0, r1 = _scenario(results, "mismatch_empty")
    assert r1["raised"] == "ValueError" and "empty" in r1["message"]
    assert r0["raised"] == "RuntimeError" and "rank(s) [1]" in r0["message"]


def test_per_process_backend_is_rejected_on_every_rank(results: list[dict[str, Any]]) -> None:
    r0, r1 = _scenario(results, "mismatch_backend")
    assert r0["raised"] == "TypeError" and "ReplicatedBackend" in r0["message"]
    assert r1["raised"] == "RuntimeError" and "rank(s) [0]" in r1["message"]


def test_train_mode_sync_batchnorm_is_rejected(results: list[dict[str, Any]]) -> None:
    for res in _scenario(results, "mismatch_syncbn"):
        assert res["raised"] == "ValueError" and "SyncBatchNorm" in res["message"]


def test_stochastic_ddp_operator_uses_every_ranks_next_batch(
    results: list[dict[str, Any]],
) -> None:
    for res in _scenario(results, "ddp_stochastic"):
        assert max(res["rel_errs"]) <= 1e-10


def test_replicated_backend_agrees_on_fresh_seeds(results: list[dict[str, Any]]) -> None:
    for res in _scenario(results, "replicated_seed"):
        assert res["probes_agree"]
        assert res["all_agree"] == [0.0]


def test_sharded_backend_reductions_and_probes(results: list[dict[str, Any]]) -> None:
    for res in _scenario(results, "sharded_backend"):
        assert res["probes_match_one_rank"]
        assert res["gather_roundtrip"]
        for key in ("dot_err", "norm_err", "gram_err", "block_dot_err"):
            assert res[key] <= 1e-12, key
        assert res["chunked_world_size_independent"]
        assert res["rademacher"]
        # counter-based draws: each rank draws its entries plus at most one partial
        # chunk per range end, not the global vector (before: big_size per probe)
        assert res["big_probes_match_one_rank"]
        assert res["drawn_per_probe"] <= res["local_size"] + 2 * res["ranges"] * res["chunk"]
        assert res["drawn_per_probe"] < 0.6 * res["big_size"]
        mean, var = res["gaussian_moments"]
        assert abs(mean) <= 4 / 200 and abs(var - 1) <= 4 * (2 / 40_000) ** 0.5


@pytest.mark.parametrize(("name", "rounds"), [("fsdp_sharded", 2), ("fsdp_sharded_uneven", 3)])
def test_fsdp_sharded_matvec_equals_unsharded(
    results: list[dict[str, Any]], name: str, rounds: int
) -> None:
    """FSDP2 shards of 7 and 5 samples, finite differences vs exact oracles.

    ``fsdp_sharded``: 2 batches per rank. ``fsdp_sharded_uneven``: 2 batches vs 1 and
    microbatches of 3, so rank 1 runs out first and pads with zero-weight passes.
    """
    per_rank = _scenario(results, name)
    assert sum(r["local_size"] for r in per_rank) == per_rank[0]["size"]
    for res in per_rank:
        assert res["rel_vs_single"] <= 1e-6
        assert res["rel_vs_dense"] <= 1e-6
        assert res["same_on_all_ranks"]
        assert res["params_unchanged"]
        # Ours: one (2 + world + width)-number all-reduce per microbatch round plus the
        # final one (the rank's piece weight travels in its own slot, each vector's squared
        # norm in its own); the rest (all-gathers, reduce-scatters) is FSDP's.
        assert res["python_all_reduce"] == rounds + 1
        numel = 3 + WORLD
        ours = [c for c in res["gloo"] if c["name"] == "gloo:all_reduce" and c["numel"] == numel]
        assert len(ours) == rounds + 1
        # A block of 3: the same rounds (one (2 + world + 3)-number all-reduce each), not 3x
        # as many.
        assert res["rel_block_vs_dense"] <= 1e-6
        assert res["rel_block_col0_vs_matvec"] <= 1e-12
        assert res["block_python_all_reduce"] == rounds + 1
        numel = 2 + WORLD + 3
        ours = [
            c for c in res["block_gloo"] if c["name"] == "gloo:all_reduce" and c["numel"] == numel
        ]
        assert len(ours) == rounds + 1


def test_slq_and_hutchinson_run_unchanged_on_fsdp_shards(results: list[dict[str, Any]]) -> None:
    """Same probes as the single-process run (world-size independent draws)."""
    for res in _scenario(results, "sharded_algorithms"):
        assert res["slq_nodes_err"] <= 1e-5
        assert abs(res["slq_integral"] - 1.0) <= 1e-6
        assert res["slq_same_on_all_ranks"]
        assert res["hutchinson_rel"] <= 1e-6
        assert res["hutchinson_same_on_all_ranks"]
        assert res["fresh_seed_same_on_all_ranks"]


def test_trace_and_slq_on_ddp_operator_equal_single_process(
    results: list[dict[str, Any]],
) -> None:
    for res in _scenario(results, "ddp_algorithms"):
        assert res["trace_rel"] <= 1e-10
        assert res["slq_nodes_err"] <= 1e-8
        assert res["fresh_seed_same_on_all_ranks"]


@pytest.mark.parametrize(("name", "tol"), [("ddp_lanczos", 1e-10), ("fsdp_lanczos", 1e-6)])
def test_lanczos_returns_single_process_eigenvalues_on_every_rank(
    results: list[dict[str, Any]], name: str, tol: float
) -> None:
    """DDP-wrapped model (uneven shards) and FSDP2 shards; numpy eigh as oracle."""
    for res in _scenario(results, name):
        assert res["eig_vs_single"] <= tol
        assert res["eig_vs_numpy"] <= tol
        assert res["max_residual_vs_dense"] <= 1e-5
        assert res["converged"]
        assert res["same_on_all_ranks"]
        assert res.get("fresh_seed_same_on_all_ranks", name == "fsdp_lanczos")


ALL_PARAMS = ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize(("poison", "names"), [("nan", ALL_PARAMS), ("inf_bias", ["2.bias"])])
def test_fsdp_operator_names_the_non_finite_batch_and_parameters_on_every_rank(
    results: list[dict[str, Any]],
    results_one_rank: list[dict[str, Any]],
    world: int,
    poison: str,
    names: list[str],
) -> None:
    """A loss going non-finite on one batch of one rank: every rank raises NonFiniteError
    naming that batch (index in its rank's loader), its rank and the parameter blocks,
    the model is restored, and the next (clean) product is exact: no rank was left in a
    collective."""
    per_rank = _scenario(results if world == 2 else results_one_rank, f"fsdp_nonfinite_{poison}")
    batch, rank = (1, 1) if world == 2 else (3, 0)
    for res in per_rank:
        assert res["raised"] == "NonFiniteError"
        assert res["batch_index"] == batch
        assert f"batch index {batch} on rank {rank}" in res["message"]
        assert "ShardedHessianOperator" in res["message"]
        assert res["param_names"] == names
        assert res["params_unchanged"]
        assert res["clean_rel_vs_single"] <= 1e-6

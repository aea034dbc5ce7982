"""Checkpoint and resume: killed runs resume to the identical result; bad files are refused.

Oracle for every resume test: the same call run uninterrupted in this process, compared
with ``torch.equal`` / ``==`` (bit for bit), not with a tolerance.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    HessianOperator,
    LambdaOperator,
    deflated_power_iteration,
    diagonal,
    lanczos,
    power_iteration_one,
    spectral_density,
    stochastic_power_iteration,
    trace,
)
from tests._gloo_job import run_gloo_job
from tests._long_run_problems import RUNS, low_rank, matrix, operator

CHILD = Path(__file__).with_name("_long_run_problems.py")


def assert_same(a: Any, b: Any) -> None:
    """Bit-for-bit equality of two results of the same algorithm."""
    if hasattr(a, "eigenvalues"):
        assert torch.equal(a.eigenvalues, b.eigenvalues)
        assert torch.equal(a.eigenvectors, b.eigenvectors)
        assert torch.equal(a.residuals, b.residuals)
        assert torch.equal(a.converged, b.converged)
        assert a.num_matvecs == b.num_matvecs
    elif hasattr(a, "nodes"):
        assert len(a.nodes) == len(b.nodes)
        for x, y in zip(a.nodes, b.nodes):
            assert np.array_equal(x, y)
        for x, y in zip(a.weights, b.weights):
            assert np.array_equal(x, y)
        assert np.array_equal(a.density, b.density)
        assert a.trace.estimate == b.trace.estimate
        assert a.num_matvecs == b.num_matvecs
    elif isinstance(a.estimate, torch.Tensor):  # DiagonalResult
        assert torch.equal(a.estimate, b.estimate)
        assert torch.equal(a.stderr, b.stderr)
        assert a.num_matvecs == b.num_matvecs
    else:
        assert a.estimate == b.estimate
        assert a.stderr == b.stderr
        assert np.array_equal(a.samples, b.samples)
        assert a.num_matvecs == b.num_matvecs


class _Kill(Exception):
    pass


def _interrupt_at(limit: int) -> Callable[[int], None]:
    def hook(count: int) -> None:
        if count > limit:
            raise _Kill

    return hook


# -- a real SIGKILL in a child process ---------------------------------------------------


@pytest.mark.parametrize("name", ["lanczos", "slq", "hutch++"])
def test_sigkill_mid_run_resumes_to_the_identical_result(name: str, tmp_path: Path) -> None:
    counted = [0]
    reference = RUNS[name](operator(lambda c: counted.__setitem__(0, c)))
    total = counted[0]
    rng = random.Random()
    # After the first checkpoint, before the end.
    kill_at = rng.randint(14 if name == "slq" else 8, total - 12)
    path = tmp_path / "run.ckpt"
    child = subprocess.Popen(
        [sys.executable, str(CHILD), name, str(path), str(torch.get_num_threads())],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    seen = 0
    for line in child.stdout:
        if line.startswith("mv "):
            seen = int(line.split()[1])
            if seen >= kill_at:
                os.kill(child.pid, signal.SIGKILL)
                break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"child was not killed (saw {seen} products)"
    assert path.exists(), f"no checkpoint after {seen} of {total} products"

    resumed_products = [0]
    resumed = RUNS[name](
        operator(lambda c: resumed_products.__setitem__(0, c)),
        checkpoint=path,
        checkpoint_every=3,
    )
    assert_same(resumed, reference)
    # It resumed (did not start over) and finished: fewer products, checkpoint removed.
    assert resumed_products[0] < total, (kill_at, resumed_products[0], total)
    assert not path.exists()


# -- interrupted in-process at random products, every algorithm -------------------------


def _hessian_problem() -> HessianOperator:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    data = [(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64))]
    return HessianOperator(model, data, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())


IN_PROCESS: dict[str, Callable[..., Any]] = {
    **RUNS,
    "hutchinson": lambda op, **kw: trace(op, 40, method="hutchinson", seed=2, block_size=3, **kw),
    "xtrace-batches": lambda op, **kw: trace(
        op, 80, method="xtrace", seed=4, block_size=3, max_sketch_size=9, **kw
    ),
    "xtrace-rademacher": lambda op, **kw: trace(
        op, 60, method="xtrace", distribution="rademacher", seed=4, block_size=4, **kw
    ),
    "deflated_power": lambda op, **kw: deflated_power_iteration(op, 2, max_iter=120, seed=1, **kw),
    "power_one": lambda op, **kw: power_iteration_one(op, max_iter=90, seed=1, **kw),
    "diagonal-hutchinson": lambda op, **kw: diagonal(op, 40, seed=2, block_size=3, **kw),
    "diagonal-xdiag": lambda op, **kw: diagonal(op, 60, method="xdiag", seed=2, block_size=4, **kw),
    "stochastic_power": lambda op, **kw: stochastic_power_iteration(
        op, 2, max_iter=70, momentum=0.3, seed=1, **kw
    ),
    # rank-deficient sketches: the fallbacks are resumable and time-limited as well
    "xtrace-rank-deficient": lambda op, **kw: trace(
        low_rank(op), 40, method="xtrace", seed=4, block_size=3, **kw
    ),
    "xdiag-rank-deficient": lambda op, **kw: diagonal(
        low_rank(op), 40, method="xdiag", seed=4, block_size=3, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(IN_PROCESS))
def test_interrupted_runs_resume_bit_for_bit(name: str, tmp_path: Path) -> None:
    run = IN_PROCESS[name]
    counted = [0]
    reference = run(operator(lambda c: counted.__setitem__(0, c)))
    total = counted[0]
    rng = random.Random(hash(name) % 1000)
    for _ in range(3):
        path = tmp_path / "run.ckpt"
        limit = rng.randint(1, total - 1)
        with pytest.raises(_Kill):
            run(operator(_interrupt_at(limit)), checkpoint=path, checkpoint_every=2)
        resumed = run(operator(), checkpoint=path, checkpoint_every=2)
        assert_same(resumed, reference)
        assert not path.exists(), "a finished run must delete its checkpoint"


def test_seed_none_resumes_with_the_recorded_seed(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    with pytest.raises(_Kill):
        lanczos(
            operator(_interrupt_at(30)), k=3, basis_size=12, checkpoint=path, checkpoint_every=2
        )
    resumed = lanczos(operator(), k=3, basis_size=12, checkpoint=path)
    assert resumed.seed is not None
    reference = lanczos(operator(), k=3, basis_size=12, seed=resumed.seed)
    assert_same(resumed, reference)


def test_basis_device_option_gives_the_same_result() -> None:
    reference = lanczos(operator(), k=3, seed=0, basis_size=12)
    moved = lanczos(operator(), k=3, seed=0, basis_size=12, basis_device="cpu")
    assert_same(moved, reference)


# -- refused checkpoints -------------------------------------------------------------------


def _write_lanczos_checkpoint(path: Path, **kwargs: Any) -> None:
    with pytest.raises(_Kill):
        lanczos(
            kwargs.pop("op", None) or operator(_interrupt_at(20)),
            k=3,
            seed=0,
            basis_size=12,
            checkpoint=path,
            checkpoint_every=2,
            **kwargs,
        )
    assert path.exists()


def test_mismatched_arguments_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    _write_lanczos_checkpoint(path)
    with pytest.raises(CheckpointMismatchError) as info:
        lanczos(operator(), k=4, seed=0, basis_size=12, checkpoint=path)
    msg = str(info.value)
    assert str(path) in msg and "k: this call has 4, the checkpoint has 3" in msg
    assert "Delete" in msg
    with pytest.raises(CheckpointMismatchError, match="seed: this call has 1"):
        lanczos(operator(), k=3, seed=1, basis_size=12, checkpoint=path)
    with pytest.raises(CheckpointMismatchError, match="algorithm: this call is 'hutch\\+\\+'"):
        trace(operator(), 30, method="hutch++", seed=0, checkpoint=path)
    # The refused file is left alone; the matching call still resumes from it.
    resumed = lanczos(operator(), k=3, seed=0, basis_size=12, checkpoint=path)
    assert_same(resumed, lanczos(operator(), k=3, seed=0, basis_size=12))


def test_mismatched_operator_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    _write_lanczos_checkpoint(path)
    a = torch.eye(61, dtype=torch.float64)
    other_size = LambdaOperator(lambda v: a @ v, 61, dtype=torch.float64)
    with pytest.raises(CheckpointMismatchError, match="operator.size: this call has 61"):
        lanczos(other_size, k=3, seed=0, basis_size=12, checkpoint=path)
    labelled = operator()
    labelled.fingerprint = "matrix-v2"  # type: ignore[attr-defined]
    with pytest.raises(CheckpointMismatchError, match="operator.fingerprint"):
        lanczos(labelled, k=3, seed=0, basis_size=12, checkpoint=path)


def test_changed_model_parameters_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    op = _hessian_problem()
    calls = [0]
    real = op._matvec

    def counting(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > 6:
            raise _Kill
        return real(v)

    op._matvec = counting  # type: ignore[method-assign]
    with pytest.raises(_Kill):
        lanczos(op, k=2, seed=0, basis_size=8, checkpoint=path, checkpoint_every=1)
    op._matvec = real  # type: ignore[method-assign]
    with torch.no_grad():
        op.params[0][0, 0] += 1e-12
    with pytest.raises(CheckpointMismatchError, match="parameters_sha256"):
        lanczos(op, k=2, seed=0, basis_size=8, checkpoint=path)
    # The same model rebuilt bit for bit resumes.
    fresh = _hessian_problem()
    resumed = lanczos(fresh, k=2, seed=0, basis_size=8, checkpoint=path)
    assert_same(resumed, lanczos(_hessian_problem(), k=2, seed=0, basis_size=8))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_corrupt_or_truncated_checkpoints_are_reported(damage: str, tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    _write_lanczos_checkpoint(path)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0x01
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"not a checkpoint at all" * 10)
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError) as info:
        lanczos(operator(), k=3, seed=0, basis_size=12, checkpoint=path)
    msg = str(info.value)
    assert str(path) in msg and "Delete it" in msg
    expected = {
        "flip": "SHA-256",
        "truncate": "truncated",
        "garbage": "not a hessian_eigenthings checkpoint",
        "empty": "not a hessian_eigenthings checkpoint",
    }[damage]
    assert expected in msg
    assert path.exists(), "a corrupt checkpoint is reported, not silently replaced"


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    _write_lanczos_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


def test_bad_checkpoint_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without checkpoint="):
        lanczos(operator(), k=2, seed=0, checkpoint_every=5)
    with pytest.raises(ValueError, match="checkpoint_every"):
        lanczos(operator(), k=2, seed=0, checkpoint=tmp_path / "a", checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        trace(operator(), 20, seed=0, checkpoint=tmp_path / "a", checkpoint_seconds=-1.0)
    with pytest.raises(ValueError, match="does not exist"):
        trace(operator(), 20, seed=0, checkpoint=tmp_path / "missing" / "a")
    with pytest.raises(ValueError, match="init_vec"):
        power_iteration_one(
            operator(), init_vec=torch.ones(60, dtype=torch.float64), checkpoint=tmp_path / "a"
        )
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        spectral_density(operator(), 2, 4, seed=0, checkpoint=3)  # type: ignore[arg-type]


# -- torchrun: rank 0 writes, every rank resumes, seeds agree ------------------------------


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs gloo",
)
def test_torchrun_ranks_agree_on_seed_and_resume_from_rank0s_file(tmp_path: Path) -> None:
    r0, r1 = run_gloo_job("tests._long_run_dist_worker", tmp_path, 2, timeout_s=120)
    # One checkpoint file (written by rank 0 only), no temporary files, removed when done.
    assert r0["files_after_kill"] == ["lanczos.ckpt"] == r1["files_after_kill"]
    assert not r0["checkpoint_left"] and not r1["checkpoint_left"]
    # seed=None resolved through the backend: every rank records and uses rank 0's seed.
    for key in ("seed", "eigenvalues", "num_matvecs", "trace_seed", "trace", "slq_seed"):
        assert r0[key] == r1[key], key
    assert r0["resumed_products"] < r0["num_matvecs"]  # resumed, did not start over
    # The workers run with one thread; so does the reference, so reductions round alike;
    # and, like theirs, its block products are column loops of its matvec.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a = matrix()
    column_loop = LambdaOperator(lambda v: a @ v, a.shape[0], dtype=torch.float64)
    try:
        reference = lanczos(column_loop, k=3, basis_size=12, seed=r0["seed"])
    finally:
        torch.set_num_threads(threads)
    assert r0["eigenvalues"] == reference.eigenvalues.tolist()
    assert r0["num_matvecs"] == reference.num_matvecs


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs gloo",
)
def test_long_runs_agree_within_their_backends_group(tmp_path: Path) -> None:
    """Deadlines and checkpoints use the operator's backend, never the default group.

    Rank 0 runs time-limited, checkpointed calls on a local operator while rank 1 runs a
    DDP operator on the group {1}; then both run one on an explicit group {0, 1}.
    """
    r0, r1 = run_gloo_job("tests._long_run_group_worker", tmp_path, 2, timeout_s=150)
    local, sub = r0["local"], r1["subgroup"]
    # A local operator inside a torchrun job: no collective, resumed bit for bit.
    assert local["lanczos_same"] and local["trace_same"] and local["seed_none_ok"]
    assert local["lanczos_calls"] > 2 and local["trace_calls"] > 2
    assert local["left"] == []
    # A subgroup whose first rank is global rank 1 writes its own checkpoint.
    assert sub["written_by_group_first_rank"]
    assert sub["resumed_same"] and sub["time_limited_same"] and sub["calls"] > 2
    assert not sub["left"]
    # The group {0, 1}: same result on both ranks; only the first rank builds the state on
    # the host and hashes the parameters.
    for r in (r0, r1):
        assert r["pair"]["same"] and r["pair"]["calls"] > 2
    assert r0["pair"]["eigenvalues"] == r1["pair"]["eigenvalues"]
    assert r0["pair"]["state_to_host"] >= r0["pair"]["calls"] - 1
    assert r0["pair"]["parameter_hashes"] >= 1
    assert r1["pair"]["state_to_host"] == 0 and r1["pair"]["parameter_hashes"] == 0


def test_long_run_keywords_are_checked_by_name() -> None:
    """The four long-run keywords are accepted by every algorithm; a misspelt one raises."""
    for call in (
        lambda **kw: lanczos(operator(), k=2, seed=0, **kw),
        lambda **kw: trace(operator(), 20, seed=0, **kw),
        lambda **kw: diagonal(operator(), 20, seed=0, **kw),
        lambda **kw: spectral_density(operator(), 2, 4, seed=0, **kw),
        lambda **kw: deflated_power_iteration(operator(), 1, max_iter=20, seed=0, **kw),
        lambda **kw: stochastic_power_iteration(operator(), 1, max_iter=20, seed=0, **kw),
    ):
        with pytest.raises(TypeError, match="checkpoint_evry"):
            call(checkpoint_evry=5)
        assert call(time_limit=1e9).stop_reason in ("converged", "max_iter", "completed")

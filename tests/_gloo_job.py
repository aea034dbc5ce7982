"""Spawn a multi-process gloo job from a test: ``python -m module out`` on ``world`` ranks.

Every rank gets the torchrun environment (rank, world size, a free local port), one
intra-op thread and this checkout on ``PYTHONPATH``; a job that does not finish within
``timeout_s`` (a collective issued on one rank only) fails the test instead of blocking
CI. Workers write ``out/rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_gloo_job(
    module: str,
    out: Path,
    world: int,
    *,
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run the job and return each rank's ``rank{r}.json`` (ranks must exit with 0).

    Args:
        module: The worker module (``tests.dist_worker``).
        out: Folder passed to the workers, where they write their results.
        world: Number of ranks.
        timeout_s: Wall-clock limit of the whole job.
        env: Extra environment variables (e.g. the scenarios to run).
    """
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, str(out)],
                cwd=REPO,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(
            f"{module} did not finish within {timeout_s} s (a collective on one rank hangs)"
        )
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{logs[rank][-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]

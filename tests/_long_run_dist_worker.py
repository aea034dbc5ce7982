"""Worker of ``tests/test_checkpoint.py::test_torchrun_*`` (one process per gloo rank).

Every rank runs the same calls with ``seed=None`` and a ``ReplicatedBackend``; the first
Lanczos call is interrupted at the same product on every rank, then resumed from the
checkpoint that rank 0 wrote. Writes ``rank<r>.json`` with what the test compares.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from hessian_eigenthings import LambdaOperator, ReplicatedBackend, lanczos, spectral_density, trace
from tests._gloo_worker import exit_after
from tests._long_run_problems import matrix


class _Kill(Exception):
    pass


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    a = matrix()
    count = [0]
    limit = [25]

    def mv(v: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        if limit[0] and count[0] > limit[0]:
            raise _Kill
        return a @ v

    op = LambdaOperator(mv, a.shape[0], dtype=torch.float64, backend=ReplicatedBackend())
    ckpt = Path(out_dir) / "lanczos.ckpt"
    with contextlib.suppress(_Kill):
        lanczos(op, k=3, basis_size=12, checkpoint=ckpt, checkpoint_every=2)
    dist.barrier()
    files = sorted(p.name for p in Path(out_dir).iterdir() if not p.name.endswith(".json"))
    limit[0] = 0
    count[0] = 0
    res = lanczos(op, k=3, basis_size=12, checkpoint=ckpt, checkpoint_seconds=0.001)
    resumed_products = count[0]
    tr = trace(op, 30, method="hutchinson", block_size=4)
    sd = spectral_density(op, num_runs=2, lanczos_steps=5)
    dist.barrier()
    out = {
        "files_after_kill": files,
        "checkpoint_left": ckpt.exists(),
        "seed": res.seed,
        "eigenvalues": res.eigenvalues.tolist(),
        "num_matvecs": res.num_matvecs,
        "resumed_products": resumed_products,
        "trace_seed": tr.seed,
        "trace": tr.estimate,
        "slq_seed": sd.seed,
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_after(main)

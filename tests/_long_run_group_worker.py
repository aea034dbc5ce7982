"""Worker of ``tests/test_checkpoint.py::test_long_runs_agree_within_their_backends_group``.

One rank of a 2-process gloo job. Three scenarios, each compared with the same call run
uninterrupted in the same process:

* ``local`` (rank 0 alone, while rank 1 is busy with ``subgroup``): a LambdaOperator (no
  process group) with ``time_limit`` and ``checkpoint``: must not issue a collective.
* ``subgroup`` (rank 1 alone): a DDP operator on the group ``{1}``: its deadlines and
  checkpoint decisions go through that group, and its first rank (global rank 1) writes.
* ``pair`` (both ranks): a DDP operator on an explicit group ``{0, 1}``: only the first
  rank builds the checkpoint state on the host and hashes the parameters.

Writes ``rank<r>.json``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import hessian_eigenthings.algorithms.checkpoint as checkpoint_module
from hessian_eigenthings import lanczos, trace
from hessian_eigenthings.algorithms.lanczos import LanczosState
from hessian_eigenthings.operators.distributed.ddp import DDPHessianOperator
from tests._gloo_worker import exit_after
from tests._long_run_problems import operator

TINY = 1e-9
COUNTS = {"state_to_host": 0, "parameter_hashes": 0}


class _Kill(Exception):
    pass


def _count(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        COUNTS[name] += 1
        return fn(*args, **kwargs)

    return counted


def _ddp_operator(group: Any, rank: int) -> DDPHessianOperator:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1 + rank)
    data = [
        (
            torch.randn(5, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (5,), generator=g),
        )
    ]
    return DDPHessianOperator(
        model, data, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), process_group=group
    )


def _until_done(call: Callable[..., Any], path: Path) -> tuple[Any, int]:
    """Call with a tiny time limit and a checkpoint until the run completes."""
    calls = 0
    while True:
        calls += 1
        res = call(checkpoint=path, checkpoint_every=10**9, time_limit=TINY)
        if res.stop_reason != "time_limit" or calls > 400:
            return res, calls


def _same(a: Any, b: Any) -> bool:
    return bool(
        torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    )


def local(out: Path) -> dict[str, Any]:
    def eig(**kw: Any) -> Any:
        return lanczos(operator(), k=3, seed=0, basis_size=12, **kw)

    def tr(**kw: Any) -> Any:
        return trace(operator(), 40, method="hutch++", seed=1, block_size=4, **kw)

    eig_res, eig_calls = _until_done(eig, out / "local-lanczos.ckpt")
    tr_res, tr_calls = _until_done(tr, out / "local-trace.ckpt")
    fresh = lanczos(operator(), k=2, basis_size=10, time_limit=60.0)  # seed=None: no broadcast
    return {
        "lanczos_same": _same(eig_res, eig()),
        "lanczos_calls": eig_calls,
        "trace_same": tr_res.estimate == tr().estimate,
        "trace_calls": tr_calls,
        "seed_none_ok": fresh.seed is not None,
        "left": sorted(p.name for p in out.glob("local-*")),
    }


def subgroup(out: Path, group: Any) -> dict[str, Any]:
    op = _ddp_operator(group, 1)
    reference = lanczos(op, k=2, seed=0, basis_size=8)
    path = out / "subgroup.ckpt"
    real = op._matvec
    count = [0]

    def dying(v: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        if count[0] > 9:
            raise _Kill
        return real(v)

    op._matvec = dying  # type: ignore[method-assign]
    with contextlib.suppress(_Kill):
        lanczos(op, k=2, seed=0, basis_size=8, checkpoint=path, checkpoint_every=2)
    written = path.exists()
    op._matvec = real  # type: ignore[method-assign]
    resumed = lanczos(op, k=2, seed=0, basis_size=8, checkpoint=path)
    limited, calls = _until_done(lambda **kw: lanczos(op, k=2, seed=0, basis_size=8, **kw), path)
    return {
        "written_by_group_first_rank": written,
        "resumed_same": _same(resumed, reference),
        "time_limited_same": _same(limited, reference),
        "calls": calls,
        "left": path.exists(),
    }


def pair(out: Path, group: Any, rank: int) -> dict[str, Any]:
    op = _ddp_operator(group, rank)
    reference = lanczos(op, k=2, seed=0, basis_size=8)
    for key in COUNTS:
        COUNTS[key] = 0
    res, calls = _until_done(
        lambda **kw: lanczos(op, k=2, seed=0, basis_size=8, **kw), out / "pair.ckpt"
    )
    return {
        "same": _same(res, reference),
        "calls": calls,
        "eigenvalues": res.eigenvalues.tolist(),
        **COUNTS,
    }


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    solo, both = dist.new_group([1]), dist.new_group([0, 1])
    LanczosState.to_dict = _count("state_to_host", LanczosState.to_dict)  # type: ignore[method-assign]
    checkpoint_module._parameters_sha256 = _count(  # type: ignore[attr-defined]
        "parameter_hashes", checkpoint_module._parameters_sha256
    )
    out = Path(out_dir)
    results: dict[str, Any] = {}
    if rank == 0:
        results["local"] = local(out)
    else:
        results["subgroup"] = subgroup(out, solo)
    dist.barrier()
    results["pair"] = pair(out, both, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_after(main)

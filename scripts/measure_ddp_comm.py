"""Count the collectives and bytes of one matvec of the distributed operators.

Runs 2 gloo ranks on CPU (spawned by this script, or under ``torchrun``) and records,
with the torch profiler, every collective the process group executes during one
matvec (``gloo:*`` events, which include collectives issued from C++ by FSDP):

* ``DDPHessianOperator`` (plain and ``DistributedDataParallel``-wrapped model),
* ``ShardedHessianOperator`` on the same model sharded with FSDP2 ``fully_shard``
  (one ``fully_shard`` unit per ``Linear`` plus the root).

Elements are per rank: what each rank contributes to the collective (its whole buffer
for all-reduce, its shard for all-gather); bytes are elements times 4 (float32 model;
the profiler does not record dtypes: the sharded operator's own control all-reduces
carry 3 float64 numbers, 12 bytes more each than shown). On gloo, FSDP's
reduce-scatter runs as an all-reduce of the full unsharded gradient buffer.

    python scripts/measure_ddp_comm.py [--width 64] [--depth 3] [--batches 2] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hessian_eigenthings.operators.distributed import DDPHessianOperator, ShardedHessianOperator


def ce(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def make_model(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(32, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def shard_data(rank: int, batches: int) -> list[Any]:
    g = torch.Generator().manual_seed(100 + rank)
    sizes = [16 - 3 * rank] * batches  # uneven shards
    return [
        (torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes
    ]


def collectives(fn: Any) -> list[tuple[str, int]]:
    # The legacy profiler records the same c10d events as kineto and starts instantly.
    with torch.autograd.profiler.profile(record_shapes=True, use_kineto=False) as prof:
        fn()
    out = []
    for e in prof.function_events:
        if not e.name.startswith("gloo:"):
            continue
        shape = (e.input_shapes or [[]])[0]
        numel = 1
        for d in shape:
            numel *= d
        out.append((e.name, numel))
    return out


def summarise(name: str, size: int, calls: list[tuple[str, int]]) -> dict[str, Any]:
    kinds = Counter(n for n, _ in calls)
    return {
        "operator": name,
        "size": size,
        "collectives": len(calls),
        "by_kind": dict(kinds),
        "elements_per_rank": sum(b for _, b in calls),
        "bytes_per_rank": 4 * sum(b for _, b in calls),
        "calls": calls if len(calls) <= 4 else None,
    }


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    data = shard_data(dist.get_rank(), args.batches)
    rows = []

    model = make_model(args.width, args.depth)
    op = DDPHessianOperator(model, data, ce)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(0))
    op.matvec(v)  # warm-up
    rows.append(summarise("DDPHessianOperator", op.size, collectives(lambda: op.matvec(v))))

    ddp = nn.parallel.DistributedDataParallel(make_model(args.width, args.depth))
    op_w = DDPHessianOperator(ddp, data, ce)
    rows.append(
        summarise("DDPHessianOperator(DDP-wrapped)", op_w.size, collectives(lambda: op_w.matvec(v)))
    )

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fsdp = copy.deepcopy(make_model(args.width, args.depth))
    mesh = init_device_mesh("cpu", (world,))
    for m in fsdp:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    sop = ShardedHessianOperator(fsdp, data, ce)
    local = sop.backend.shard(v)
    sop.matvec(local)  # warm-up
    rows.append(
        summarise(
            f"ShardedHessianOperator(FSDP2, {args.batches} batches/rank)",
            sop.size,
            collectives(lambda: sop.matvec(local)),
        )
    )
    if dist.get_rank() == 0:
        meta = {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "world_size": world,
            "width": args.width,
            "depth": args.depth,
            "batches_per_rank": args.batches,
        }
        print(
            f"{'operator':<48} {'size':>8} {'collectives':>11} {'elements/rank':>13} "
            f"{'bytes/rank':>11}  kinds"
        )
        for r in rows:
            print(
                f"{r['operator']:<48} {r['size']:>8} {r['collectives']:>11} "
                f"{r['elements_per_rank']:>13} {r['bytes_per_rank']:>11}  {r['by_kind']}"
            )
        if args.json:
            with open(args.json, "a") as fh:
                for r in rows:
                    fh.write(json.dumps({**meta, **r}) + "\n")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--json", default=None, help="append one JSON row per operator")
    args = parser.parse_args()
    if "RANK" in os.environ:  # under torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), 0, args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, args), nprocs=2, join=True)


if __name__ == "__main__":
    main()

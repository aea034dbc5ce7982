"""The worker side of a gloo job spawned by :func:`tests._gloo_job.run_gloo_job`.

:func:`run_scenarios` runs named scenarios on every rank, in the same order, and writes
``out_dir/rank{r}.json``; :func:`exit_after` runs a worker's ``main`` and ends the process
without the interpreter's teardown.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import torch
import torch.distributed as dist


def run_scenarios(
    out_dir: str,
    scenarios: Mapping[str, Callable[[int], dict[str, Any]]],
    *,
    select_env: str | None = None,
) -> None:
    """Run each scenario ``fn(rank)`` on every rank and write their results.

    One intra-op thread; a scenario that raises records its traceback (the others still
    run); a barrier after each keeps the ranks in step. The results are written and the
    process group destroyed even if something outside the scenarios raises.

    Args:
        out_dir: Where ``rank{r}.json`` goes.
        scenarios: Name -> ``fn(rank) -> dict`` (its wall-clock is added as ``seconds``).
        select_env: An environment variable holding a comma-separated subset of the names
            to run (unset or empty: all).
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    wanted = os.environ.get(select_env, "") if select_env else ""
    chosen = {n: f for n, f in scenarios.items() if not wanted or n in wanted.split(",")}
    results: dict[str, Any] = {}
    try:
        for name, fn in chosen.items():
            start = time.perf_counter()
            try:
                results[name] = fn(rank)
                results[name]["seconds"] = time.perf_counter() - start
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(results, fh)
        dist.destroy_process_group()


def exit_after(main: Callable[[str], None]) -> NoReturn:
    """Run ``main(sys.argv[1])``, then end the process with status 0.

    The results are written and the process group destroyed by then: skipping the
    interpreter's teardown avoids gloo's threads now and then aborting a finished process
    ("terminate called without an active exception"). A failure in ``main`` raises before
    this point and still exits non-zero.
    """
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

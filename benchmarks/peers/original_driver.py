"""Run benchmark tasks for one adapter in a fresh process; read JSON on stdin, print JSON.

Used with ``benchmarks/.venv-original/bin/python`` for the original hessian-eigenthings
1.0.0a5, whose import name clashes with this library's (the harness itself imports this
library, so the original can never share its process).

Input: ``{"adapter": "peer_original", "smoke": true, "threads": 1, "jobs": [{"problem":
"mlp_digits", "dtype": "float64", "tasks": [...]}, ...]}``; each job builds its problem
afresh. Output (last line of stdout): ``{"available": null | reason, "version": ...,
"jobs": [{"param_checksum": ..., "results": [...]}, ...]}``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
# Import problems.py and the peers package; never the repository root, whose
# hessian_eigenthings would shadow the one installed in the running environment.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(BENCH)]
sys.path.insert(0, BENCH)
warnings.filterwarnings("ignore")


def main() -> None:
    spec = json.loads(sys.stdin.read())
    import problems as P
    import torch
    from peers.common import run_tasks

    P.set_threads(spec.get("threads", 1))
    adapter = importlib.import_module(f"peers.{spec['adapter']}")
    out: dict = {"available": adapter.available()}
    if out["available"] is None:
        out["version"] = adapter.version()
        out["jobs"] = []
        for job in spec["jobs"]:
            dtype = getattr(torch, job["dtype"])
            problem = P.build(job["problem"], smoke=spec["smoke"], dtype=dtype)
            results = run_tasks(adapter, problem, job["tasks"])
            adapter.clear()
            checksum = float(P.flat_params(problem).double().abs().sum())
            out["jobs"].append({"param_checksum": checksum, "results": results})
    print(json.dumps(out))


if __name__ == "__main__":
    main()

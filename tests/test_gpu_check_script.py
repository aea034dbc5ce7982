"""The GPU validation script's plumbing, through its CPU dry run (tiny sizes, ~30 s).

One run of ``scripts/gpu_check.sh --cpu-dry-run`` checks every section's code path on CPU
(the Triton kernel through the interpreter), the one-JSON output, and failure isolation:
one section is made to fail and one to hang after their rows, and both must be recorded
(error text, timeout) with their rows kept while the other sections still run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("triton")
    if shutil.which("bash") is None:
        pytest.skip("needs bash for scripts/gpu_check.sh")
    out = tmp_path_factory.mktemp("gpu_check") / "dry.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    env["OMP_NUM_THREADS"] = "1"
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(out)]
    cmd += ["--inject-failure", "cuda_tests=error"]
    cmd += ["--inject-failure", "kernel_sweep=hang", "--budget", "kernel_sweep=10"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text()), proc.stdout


def _rows(result, section):
    return [r for r in result["rows"] if r["section"] == section]


def test_dry_run_writes_one_json_with_machine_and_sections(dry_run):
    result, _ = dry_run
    assert result["dry_run"] is True
    machine = result["machine"]
    assert machine["torch"] == torch.__version__ and machine["triton"]
    assert machine["cuda_available"] is False
    status = {name: s["status"] for name, s in result["sections"].items()}
    assert status == {
        "machine": "ok",
        "cuda_tests": "error",
        "kernel": "ok",
        "kernel_sweep": "timeout",
        "products": "ok",
        "memory": "skipped",
    }
    assert "needs CUDA" in result["sections"]["memory"]["reason"]


def test_failing_and_hanging_sections_keep_their_rows(dry_run):
    result, _ = dry_run
    tests = result["sections"]["cuda_tests"]
    assert "injected failure" in tests["error"]
    rows = _rows(result, "cuda_tests")
    assert rows and all(r["outcome"] == "skipped" for r in rows)  # no CUDA here
    assert any("test_fused_ce_cuda" in r["test"] for r in rows)
    sweep = result["sections"]["kernel_sweep"]
    assert "budget" in sweep["error"] and sweep["wall_s"] < 10 + 10
    assert any(r.get("from_table") for r in _rows(result, "kernel_sweep"))


def test_kernel_rows_compare_backends_with_float64(dry_run):
    result, _ = dry_run
    rows = _rows(result, "kernel")
    seen = {(r["backend"], r["V"], r["dtype"]) for r in rows}
    want = {
        (b, v, d) for b in ("triton", "eager") for v in (7, 1000) for d in ("float32", "bfloat16")
    }
    assert seen == want
    for r in rows:
        assert "error" not in r, r
        bound = 1e-5 if r["dtype"] == "float32" else 2e-2
        assert r["finite"] and r["max_rel_err"] <= bound and r["fro_rel_err"] <= bound, r
        assert r["median_ms"] > 0 and r["effective_TBps"] > 0
        if r["backend"] == "triton":
            assert r["bytes_moved"] > r["bytes_compulsory"] and r["block"] >= 16


def test_product_rows_time_hessian_and_ggn_against_a_training_step(dry_run):
    result, stdout = dry_run
    rows = _rows(result, "products")
    keys = {(r["kind"], r["mode"], r["block"]) for r in rows}
    assert {("train_step", "-", 1), ("hessian", "loop", 1), ("ggn", "loop", 2)} <= keys
    assert all(r["per_vector_ms"] > 0 and r["over_train_step"] > 0 for r in rows)
    assert "== summary" in stdout and "products hessian" in stdout


def test_block_mode_detection():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    class Loop:
        def __init__(self, model, data, *, microbatch_size=None):
            pass

    class Named:
        def __init__(self, model, data, *, block_mode="loop"):
            pass

    class Flag:
        def __init__(self, model, data, *, vmap=False):
            pass

    assert gpu_check.block_mode_options(Loop) == {}
    assert gpu_check.block_mode_options(Named) == {"block_mode": "vmap"}
    assert gpu_check.block_mode_options(Flag) == {"vmap": True}
    assert gpu_check.block_mode_options(Named, "loop") == {"block_mode": "loop"}
    # the library's operators declare block_mode once, in the data options
    from hessian_eigenthings import GGNOperator, HessianOperator

    for cls in (HessianOperator, GGNOperator):
        assert gpu_check.block_mode_options(cls) == {"block_mode": "vmap"}
        assert gpu_check.block_mode_options(cls, "loop") == {"block_mode": "loop"}
    assert gpu_check.peak_bandwidth("NVIDIA H200") == (4.8, "H200")
    assert gpu_check.peak_bandwidth("NVIDIA H100 80GB HBM3") == (3.35, "H100")
    assert gpu_check.peak_bandwidth("NVIDIA H100 PCIe") == (2.0, "H100 PCIe")
    assert gpu_check.peak_bandwidth("NVIDIA A100-SXM4-80GB") == (2.039, "A100-SXM4-80GB")
    assert gpu_check.peak_bandwidth("Some Future GPU") == (None, None)

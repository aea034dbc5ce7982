"""One-run GPU validation: CUDA tests, the Triton CE-HVP kernel, curvature products, memory.

Run it on a machine with one CUDA GPU (H100/H200 class; the sections' budgets add up to
570 s, and ``--time-limit`` caps the whole run):

    scripts/gpu_check.sh                               # benchmarks/results/gpu_check.json
    python scripts/gpu_check.py --out results.json     # the same, without the wrapper
    python scripts/gpu_check.py --cpu-dry-run          # tiny sizes on CPU: the plumbing

The how-to page ``docs/how-to/gpu-check.md`` says how to read the JSON.

Sections, each in its own child process with its own time budget, so one failing or
hanging part records its error (or its timeout) and the others still run; rows written
before a failure are kept:

``machine``       GPU name, driver, memory; torch, CUDA, Triton, transformers versions.
``cuda_tests``    ``pytest -m cuda`` over the test files that use the marker.
``kernel``        ``fused_ce_hvp`` by Triton, ``torch.compile`` and eager at N = 8192 tokens,
                  V in {32000, 50257, 131072, 262144}, float32 and bfloat16: max and relative
                  errors against a float64 reference (computed in row chunks), median time,
                  achieved bandwidth against the device's peak and against a device copy
                  measured in the same run, and peak memory beyond the output.
``kernel_sweep``  the Triton kernel over blocks x warps at V = 50257 and 262144, against the
                  configuration the launcher's table picks.
``products``      GPT-2 small (12 layers, d = 768, V = 50257, from ``GPT2Config``, random
                  weights): Hessian and GGN products per vector for blocks of 1, 8 and 32
                  vectors through ``op.matmat`` (column loop), and through a vmap / block mode
                  when the operators expose one; ratios to a training step timed alike.
``memory``        peak ``torch.cuda.max_memory_allocated`` above the resident model and batch
                  for a training step (forward + backward), a GGN product and a Hessian
                  product on the same model and batch.

Everything lands in ONE JSON file: ``machine``, per-section status (``ok``, ``error``,
``timeout``, ``skipped``) with wall time, budget, error text and notes, and ``rows`` (each
with its ``section``). ``--cpu-dry-run`` runs the same code paths with tiny sizes on CPU
(the Triton kernel through ``TRITON_INTERPRET=1``) and skips what needs CUDA (the memory
section; the CUDA tests then all report skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import inspect
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("machine", "cuda_tests", "kernel", "kernel_sweep", "products", "memory")
# seconds per section on a GPU (the sum, plus start-up, stays under ten minutes)
BUDGETS = {
    "machine": 30,
    "cuda_tests": 120,
    "kernel": 150,
    "kernel_sweep": 70,
    "products": 140,
    "memory": 60,
}
DRY_BUDGETS = {name: 60 for name in SECTIONS}
CUDA_ONLY = ("memory",)
INTERPRETED = ("kernel", "kernel_sweep")  # TRITON_INTERPRET=1 in the dry run

# peak DRAM bandwidth in TB/s by GPU name, most specific first (vendor data sheets)
PEAK_TBPS = [
    ("GH200", 4.0),
    ("H200", 4.8),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),
    ("H800", 3.35),
    ("B200", 8.0),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),
    ("L40S", 0.864),
    ("L4", 0.3),
    ("A10G", 0.6),
    ("V100", 0.9),
    ("RTX 4090", 1.008),
    ("MI300X", 5.3),
]

IGNORE = -100


def peak_bandwidth(name: str) -> tuple[float | None, str | None]:
    """``(TB/s, matched table entry)`` for a GPU name, ``(None, None)`` if unknown."""
    for key, tbps in PEAK_TBPS:
        if key.lower() in name.lower():
            return tbps, key
    return None, None


# ---------------------------------------------------------------- child side
class Emitter:
    """Writes one JSON object per line to the part file, flushed, so a killed child keeps
    everything it finished."""

    def __init__(self, path: Path, section: str) -> None:
        self.f = path.open("a", encoding="utf-8")
        self.section = section

    def row(self, **fields: Any) -> None:
        self._write({"row": {"section": self.section, **fields}})
        printable = {k: v for k, v in fields.items() if not isinstance(v, (list, dict))}
        print(f"[{self.section}] {printable}", flush=True)

    def note(self, text: str) -> None:
        self._write({"note": text})
        print(f"[{self.section}] note: {text}", flush=True)

    def machine(self, info: dict[str, Any]) -> None:
        self._write({"machine": info})

    def _write(self, obj: dict[str, Any]) -> None:
        self.f.write(json.dumps(obj, default=str) + "\n")
        self.f.flush()


class Clock:
    """The section's soft deadline: stop starting new rows when it has passed."""

    def __init__(self, budget: float, margin: float) -> None:
        self.deadline = time.monotonic() + budget * margin

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: Any) -> float:
    """Seconds of one call, synchronised (CUDA events on a GPU)."""
    import torch

    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def section_machine(cfg: dict[str, Any], out: Emitter, clock: Clock) -> None:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    for mod in ("triton", "transformers", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import hessian_eigenthings

        info["hessian_eigenthings"] = getattr(hessian_eigenthings, "__version__", None)
    except ImportError as err:
        info["hessian_eigenthings"] = f"import failed: {err}"
    git = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    info["git_commit"] = git.stdout.strip() or None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["multiprocessors"] = props.multi_processor_count
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.stdout.strip() else None
        tbps, entry = peak_bandwidth(props.name)
        if cfg.get("peak_tbps"):
            tbps, entry = cfg["peak_tbps"], "--peak-tbps"
        info["peak_TBps"] = tbps
        info["peak_from"] = entry
    out.machine(info)


def section_cuda_tests(cfg: dict[str, Any], out: Emitter, clock: Clock) -> None:
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "mark.cuda" in p.read_text(encoding="utf-8")
    )
    if not files:
        out.note("no test file uses the cuda marker")
        return
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
        cmd += [f"--junitxml={report}", *files]
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=max(clock.left(), 1.0),
        )
        if not report.exists():
            raise RuntimeError(
                f"pytest wrote no report (rc {proc.returncode}): {proc.stdout[-3000:]}"
            )
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome, message = "passed", None
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = "failed" if tag == "failure" else tag
                    message = (node.get("message") or node.text or "")[:500]
            out.row(
                test=f"{case.get('classname')}::{case.get('name')}",
                outcome=outcome,
                seconds=float(case.get("time") or 0.0),
                message=message,
            )
        out.note(f"pytest rc {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}")


def _problem(n: int, vocab: int, dtype: Any, device: Any, seed: int = 0) -> tuple[Any, Any, Any]:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    z = (3 * torch.randn(n, vocab, generator=gen, device=device)).to(dtype)
    u = torch.randn(n, vocab, generator=gen, device=device).to(dtype)
    t = torch.randint(0, vocab, (n,), generator=gen, device=device)
    t[::97] = IGNORE  # about 1% ignored rows, as padding would give
    return z, t, u


def _errors(got: Any, z: Any, t: Any, u: Any, chunk_elems: int) -> dict[str, float]:
    """Max abs error, max error / max |ref| and Frobenius relative error vs float64."""
    import torch

    from hessian_eigenthings.loss_fns.fused_ce import ce_hvp_eager

    n_valid = (t != IGNORE).sum()
    rows = max(1, chunk_elems // z.shape[-1])
    max_err = max_ref = err2 = ref2 = 0.0
    for s in range(0, z.shape[0], rows):
        sl = slice(s, s + rows)
        ref = ce_hvp_eager(z[sl].double(), t[sl], u[sl].double(), n_valid=n_valid)
        diff = got[sl].double() - ref
        max_err = max(max_err, float(diff.abs().max()))
        max_ref = max(max_ref, float(ref.abs().max()))
        err2 += float((diff * diff).sum())
        ref2 += float((ref * ref).sum())
        del ref, diff
    return {
        "max_abs_err": max_err,
        "max_rel_err": max_err / max(max_ref, 1e-300),
        "fro_rel_err": math.sqrt(err2 / max(ref2, 1e-300)),
        "finite": bool(torch.isfinite(got).all()),
    }


def _copy_bandwidth(device: Any, nbytes: int, rounds: int) -> float:
    """Bytes/s of a device-to-device copy (read + write), the in-run baseline."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [time_call(lambda: dst.copy_(src), device) for _ in range(rounds)]
    return 2 * nbytes / statistics.median(times)


def _run_fused(z: Any, t: Any, u: Any, backend: str, **kw: Any) -> Any:
    from hessian_eigenthings.loss_fns.fused_ce import ce_hvp_triton, fused_ce_hvp

    if kw:
        return ce_hvp_triton(z, t, u, **kw)
    return fused_ce_hvp(z, t, u, backend=backend)


def _traffic(t: Any, vocab: int, elem: int) -> tuple[int, int]:
    """Bytes the two-pass kernel moves, and the compulsory bytes (read once, write once).

    A valid row reads logits and direction twice and writes once; an ignored row writes.
    """
    n = t.numel()
    valid = int((t != IGNORE).sum())
    return valid * vocab * 4 * elem + n * vocab * elem, valid * vocab * 2 * elem + n * vocab * elem


def _kernel_case(
    cfg: dict[str, Any], out: Emitter, vocab: int, dtype_name: str, copy_bw: float
) -> None:
    """Errors, memory and interleaved timings of every backend on one (N, V, dtype)."""
    import torch

    from hessian_eigenthings.loss_fns.fused_ce.triton_kernel import kernel_config

    device = torch.device(cfg["device"])
    peak = cfg.get("peak_TBps")
    z, t, u = _problem(cfg["tokens"], vocab, getattr(torch, dtype_name), device)
    moved, compulsory = _traffic(t, vocab, z.element_size())
    rows: dict[str, dict[str, Any]] = {}
    for backend in cfg["backends"]:
        row: dict[str, Any] = {"backend": backend, "V": vocab, "N": z.shape[0], "dtype": dtype_name}
        rows[backend] = row
        try:
            for _ in range(2):  # warm-up (compilation)
                _run_fused(z, t, u, backend)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            res = _run_fused(z, t, u, backend)
            if device.type == "cuda":
                extra = torch.cuda.max_memory_allocated(device) - before
                row["peak_extra_over_output"] = extra / (res.numel() * res.element_size())
            row.update(_errors(res, z, t, u, cfg["ref_chunk"]))
            del res
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:800]
    live = [b for b, r in rows.items() if "error" not in r]
    times: dict[str, list[float]] = {b: [] for b in live}
    for _ in range(cfg["rounds"]):  # interleaved, so drift hits every backend alike
        for backend in live:
            times[backend].append(time_call(lambda b=backend: _run_fused(z, t, u, b), device))
    for backend, row in rows.items():
        if backend in times:
            med = statistics.median(times[backend])
            row.update(
                median_ms=1e3 * med,
                min_ms=1e3 * min(times[backend]),
                bytes_compulsory=compulsory,
                effective_TBps=compulsory / med / 1e12,
                effective_over_copy=compulsory / med / copy_bw,
            )
            if "eager" in times:
                row["speedup_over_eager"] = statistics.median(times["eager"]) / med
            if backend == "triton":
                used = kernel_config(vocab, z.element_size())
                row.update(
                    block=used.block,
                    num_warps=used.num_warps,
                    bytes_moved=moved,
                    achieved_TBps=moved / med / 1e12,
                    achieved_over_copy=moved / med / copy_bw,
                    achieved_over_peak=None if peak is None else moved / med / 1e12 / peak,
                )
        out.row(**{k: v for k, v in row.items() if k != "section"})


def section_kernel(cfg: dict[str, Any], out: Emitter, clock: Clock) -> None:
    import torch

    device = torch.device(cfg["device"])
    copy_bw = _copy_bandwidth(device, cfg["copy_bytes"], cfg["rounds"])
    out.note(f"device copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)")
    for vocab in cfg["vocabs"]:
        for dtype_name in cfg["dtypes"]:
            if clock.expired():
                out.note(f"budget spent: skipped V={vocab} {dtype_name} and later")
                return
            _kernel_case(cfg, out, vocab, dtype_name, copy_bw)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _sweep_case(
    cfg: dict[str, Any], out: Emitter, clock: Clock, vocab: int, dtype_name: str
) -> bool:
    """Time the table's configuration and the sweep's; False when the budget ran out."""
    import torch

    from hessian_eigenthings.loss_fns.fused_ce.triton_kernel import kernel_config

    device = torch.device(cfg["device"])
    peak = cfg.get("peak_TBps")
    z, t, u = _problem(cfg["tokens"], vocab, getattr(torch, dtype_name), device)
    moved, _ = _traffic(t, vocab, z.element_size())
    table = tuple(kernel_config(vocab, z.element_size()))
    configs = [table, *(tuple(c) for c in cfg["sweep"] if tuple(c) != table)]
    timed: dict[tuple[int, ...], float] = {}
    finished = True
    for block, warps in configs:
        if clock.expired():
            out.note(f"budget spent during V={vocab} {dtype_name}")
            finished = False
            break
        row: dict[str, Any] = {"V": vocab, "N": z.shape[0], "dtype": dtype_name}
        row.update(block=block, num_warps=warps, from_table=(block, warps) == table)
        kw = {"block_size": block, "num_warps": warps}
        try:
            _run_fused(z, t, u, "triton", **kw)  # compile
            times = [
                time_call(lambda kw=kw: _run_fused(z, t, u, "triton", **kw), device)
                for _ in range(cfg["rounds"])
            ]
        except Exception as err:
            out.row(**row, error=f"{type(err).__name__}: {err}"[:500])
            continue
        med = statistics.median(times)
        timed[(block, warps)] = med
        achieved = moved / med / 1e12
        out.row(
            **row,
            median_ms=1e3 * med,
            achieved_TBps=achieved,
            achieved_over_peak=None if peak is None else achieved / peak,
        )
    if table in timed:
        best = min(timed, key=timed.__getitem__)
        out.row(
            V=vocab,
            dtype=dtype_name,
            summary=True,
            table_config=list(table),
            best_config=list(best),
            table_over_best_time=timed[table] / timed[best],
        )
    return finished


def section_kernel_sweep(cfg: dict[str, Any], out: Emitter, clock: Clock) -> None:
    for vocab in cfg["sweep_vocabs"]:
        for dtype_name in cfg["dtypes"]:
            if not _sweep_case(cfg, out, clock, vocab, dtype_name):
                return


def _gpt2(cfg: dict[str, Any], device: Any) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = cfg["model"]
    config = GPT2Config(
        n_layer=m["layers"],
        n_embd=m["d"],
        n_head=m["heads"],
        vocab_size=m["vocab"],
        n_positions=max(m["tokens"], 64),
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config).to(device=device, dtype=getattr(torch, m["dtype"])).eval()
    ids = torch.randint(0, m["vocab"], (m["batch"], m["tokens"]), device=device)
    labels = ids.clone()
    labels[:, -3:] = IGNORE  # some padding
    return model, {"input_ids": ids, "labels": labels}


def _operators(
    model: Any, batch: dict[str, Any], cfg: dict[str, Any], **options: Any
) -> dict[str, Any]:
    import hessian_eigenthings as he
    from hessian_eigenthings.loss_fns import huggingface as hf

    return {
        "hessian": he.HessianOperator(
            model, [batch], hf.hf_lm_loss(), **options.get("hessian", {})
        ),
        "ggn": he.GGNOperator(
            model,
            [batch],
            hf.hf_lm_forward,
            hf.hf_lm_loss_of_output(fused=cfg["fused"]),
            **options.get("ggn", {}),
        ),
    }


BLOCK_OPTION_NAMES = ("block_mode", "vmap", "matmat_mode", "batched")


def block_mode_options(op_class: Any) -> dict[str, Any]:
    """Constructor options that switch an operator's ``matmat`` to a vmap / block mode.

    Looks for a keyword named like ``block_mode="vmap"`` or ``vmap=True`` in the operator's
    signature; returns ``{}`` when there is none (then only the column loop is timed).
    """
    params = inspect.signature(op_class.__init__).parameters
    for name in BLOCK_OPTION_NAMES:
        if name in params:
            default = params[name].default
            if isinstance(default, bool) or name in ("vmap", "batched"):
                return {name: True}
            return {name: "vmap"}
    return {}


def _train_step(model: Any, batch: dict[str, Any]) -> None:
    loss = model(**batch).loss
    loss.backward()


def section_products(cfg: dict[str, Any], out: Emitter, clock: Clock) -> None:
    import torch

    import hessian_eigenthings as he

    device = torch.device(cfg["device"])
    model, batch = _gpt2(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    out.note(
        f"GPT-2 with {n_params / 1e6:.1f}M parameters, batch {tuple(batch['input_ids'].shape)}"
    )
    variants: dict[str, dict[str, Any]] = {"loop": {}}
    for kind, cls in (("hessian", he.HessianOperator), ("ggn", he.GGNOperator)):
        found = block_mode_options(cls)
        if found:
            variants.setdefault("vmap", {})[kind] = found
    if "vmap" not in variants:
        out.note("the operators expose no block-mode / vmap option: timing the column loop only")
    # baseline: a training step (forward + backward), timed the same way
    for _ in range(2):
        _train_step(model, batch)
    model.zero_grad(set_to_none=True)
    step_times = []
    for _ in range(cfg["product_rounds"]):
        step_times.append(time_call(lambda: _train_step(model, batch), device))
        model.zero_grad(set_to_none=True)
    step = statistics.median(step_times)
    out.row(kind="train_step", mode="-", block=1, per_vector_ms=1e3 * step, over_train_step=1.0)
    for mode, options in variants.items():
        ops = _operators(model, batch, cfg, **options)
        for kind, op in ops.items():
            if mode != "loop" and kind not in options:
                continue  # this operator has no block mode: its loop is timed already
            gen = torch.Generator(device=device).manual_seed(1)
            op.matmat(torch.randn(op.size, 1, generator=gen, device=device, dtype=op.dtype))
            for b in cfg["blocks"]:
                if clock.expired():
                    out.note(f"budget spent before {kind}/{mode} block {b}")
                    break
                V = torch.randn(op.size, b, generator=gen, device=device, dtype=op.dtype)
                rounds = cfg["product_rounds"] if b == 1 else max(1, cfg["product_rounds"] // 2)
                try:
                    times = [
                        time_call(lambda V=V, op=op: op.matmat(V), device) for _ in range(rounds)
                    ]
                except Exception as err:
                    out.row(
                        kind=kind, mode=mode, block=b, error=f"{type(err).__name__}: {err}"[:800]
                    )
                    break
                per_vector = statistics.median(times) / b
                out.row(
                    kind=kind,
                    mode=mode,
                    block=b,
                    options=options.get(kind, {}),
                    per_vector_ms=1e3 * per_vector,
                    over_train_step=per_vector / step,
                    rounds=rounds,
                )
                del V


def section_memory(cfg: dict[str, Any], out: Emitter, clock: Clock) -> None:
    import torch

    device = torch.device(cfg["device"])
    model, batch = _gpt2(cfg, device)
    ops = _operators(model, batch, cfg)  # the defaults: the LM head chunked over tokens
    off = {"lm_head": "off"}
    unchunked = _operators(model, batch, cfg, hessian=off, ggn=off)
    v = torch.randn(ops["ggn"].size, device=device, dtype=ops["ggn"].dtype)
    work = {
        "train_step": lambda: _train_step(model, batch),
        "ggn_matvec": lambda: ops["ggn"].matvec(v),
        "hessian_matvec": lambda: ops["hessian"].matvec(v),
        "ggn_matvec_unchunked": lambda: unchunked["ggn"].matvec(v),
        "hessian_matvec_unchunked": lambda: unchunked["hessian"].matvec(v),
    }
    peaks: dict[str, int] = {}
    for repeat in range(2):  # the second pass excludes one-time allocations (cuBLAS workspaces)
        for name, fn in work.items():
            if clock.expired():
                out.note(f"budget spent before {name} (pass {repeat})")
                return
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            result = fn()
            torch.cuda.synchronize(device)
            peaks[name] = torch.cuda.max_memory_allocated(device) - base
            del result
            model.zero_grad(set_to_none=True)
            if repeat == 1:
                out.row(
                    what=name,
                    peak_above_resident_MiB=peaks[name] / 2**20,
                    resident_MiB=base / 2**20,
                )
    train = peaks["train_step"]
    out.row(
        what="ratios",
        ggn_over_train_step=peaks["ggn_matvec"] / train,
        hessian_over_train_step=peaks["hessian_matvec"] / train,
        ggn_unchunked_over_train_step=peaks["ggn_matvec_unchunked"] / train,
        hessian_unchunked_over_train_step=peaks["hessian_matvec_unchunked"] / train,
    )


RUNNERS: dict[str, Callable[[dict[str, Any], Emitter, Clock], None]] = {
    "machine": section_machine,
    "cuda_tests": section_cuda_tests,
    "kernel": section_kernel,
    "kernel_sweep": section_kernel_sweep,
    "products": section_products,
    "memory": section_memory,
}


def child(section: str, part: Path, cfg: dict[str, Any], budget: float) -> int:
    out = Emitter(part, section)
    try:
        RUNNERS[section](cfg, out, Clock(budget, cfg["soft_margin"]))
        injected = cfg.get("inject", {}).get(section)
        if injected == "error":
            raise RuntimeError(
                f"injected failure after the section's rows (--inject-failure {section}=error)"
            )
        if injected == "hang":
            time.sleep(10 * budget)
    except Exception:
        out._write({"error": traceback.format_exc()[-4000:]})
        return 1
    return 0


# ---------------------------------------------------------------- parent side
def config(dry: bool, args: argparse.Namespace) -> dict[str, Any]:
    if dry:
        return {
            "device": "cpu",
            "tokens": 8,
            "vocabs": [7, 1000],
            "sweep_vocabs": [1000],
            "sweep": [[64, 1], [256, 2]],
            "dtypes": ["float32", "bfloat16"],
            "backends": ["triton", "eager"],
            "rounds": 2,
            "copy_bytes": 2**20,
            "ref_chunk": 2**16,
            "blocks": [1, 2],
            "product_rounds": 1,
            "fused": "eager",
            "model": {
                "layers": 2,
                "d": 32,
                "heads": 2,
                "vocab": 101,
                "tokens": 16,
                "batch": 2,
                "dtype": "float32",
            },
            "soft_margin": 0.8,
            "peak_tbps": args.peak_tbps,
        }
    return {
        "device": "cuda",
        "tokens": 8192,
        "vocabs": [32000, 50257, 131072, 262144],
        "sweep_vocabs": [50257, 262144],
        "sweep": [[1024, 4], [2048, 4], [2048, 8], [4096, 8], [4096, 16], [8192, 8], [8192, 16]],
        "dtypes": ["float32", "bfloat16"],
        "backends": ["triton", "compile", "eager"],
        "rounds": 5,
        "copy_bytes": 2**32,
        "ref_chunk": 2**27,
        "blocks": [1, 8, 32],
        "product_rounds": 3,
        "fused": "auto",
        "model": {
            "layers": 12,
            "d": 768,
            "heads": 12,
            "vocab": 50257,
            "tokens": args.tokens,
            "batch": args.batch,
            "dtype": args.model_dtype,
        },
        "soft_margin": 0.85,
        "peak_tbps": args.peak_tbps,
    }


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_section(
    name: str, cfg: dict[str, Any], budget: float, dry: bool, workdir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """Run one section in a child process; returns (status, rows, machine info)."""
    part = workdir / f"{name}.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    if dry and name in INTERPRETED:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--part", str(part)]
    cmd += ["--child-config", json.dumps(cfg), "--child-budget", str(budget)]
    t0 = time.monotonic()
    status: dict[str, Any] = {"budget_s": budget}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []

    def pump(stream: IO[str]) -> None:  # echo the child's output live, keep it for errors
        for line in stream:
            lines.append(line)
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=budget)
        status["status"] = "ok" if rc == 0 else "error"
        status["returncode"] = rc
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        status["status"] = "timeout"
        status["error"] = (
            f"killed after its budget of {budget:.0f} s; rows finished before are kept"
        )
    reader.join(timeout=5)
    status["wall_s"] = round(time.monotonic() - t0, 2)
    rows: list[dict[str, Any]] = []
    machine = None
    notes = []
    if part.exists():
        for line in part.read_text(encoding="utf-8").splitlines():
            obj = json.loads(line)
            if "row" in obj:
                rows.append(obj["row"])
            elif "note" in obj:
                notes.append(obj["note"])
            elif "machine" in obj:
                machine = obj["machine"]
            elif "error" in obj:
                status["error"] = obj["error"]
    if status["status"] == "error" and "error" not in status:
        status["error"] = "".join(lines)[-4000:] or f"child exited with {status.get('returncode')}"
    status["notes"] = notes
    status["rows"] = len(rows)
    return status, rows, machine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file to write (default benchmarks/results/gpu_check.json, or "
        "gpu_check_dry_run.json with --cpu-dry-run)",
    )
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="tiny sizes on CPU, CUDA-only parts skipped"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="SECTION=SECONDS",
        help="override a section's budget",
    )
    parser.add_argument("--time-limit", type=float, default=570.0, help="seconds for the whole run")
    parser.add_argument(
        "--peak-tbps", type=float, default=None, help="device peak bandwidth, if not in the table"
    )
    parser.add_argument(
        "--tokens", type=int, default=512, help="sequence length of the GPT-2 batch"
    )
    parser.add_argument("--batch", type=int, default=4, help="sequences in the GPT-2 batch")
    parser.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--inject-failure",
        action="append",
        default=[],
        metavar="SECTION=error|hang",
        help="make a section fail (or hang until its budget) after its rows: checks isolation",
    )
    parser.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    parser.add_argument("--child-budget", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.part, json.loads(args.child_config), args.child_budget)

    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; expected a subset of {list(SECTIONS)}")
    dry = args.cpu_dry_run
    budgets = dict(DRY_BUDGETS if dry else BUDGETS)
    for item in args.budget:
        name, _, value = item.partition("=")
        if name not in budgets or not value:
            parser.error(
                f"--budget expects SECTION=SECONDS with SECTION in {list(SECTIONS)}, got {item!r}"
            )
        budgets[name] = float(value)
    cfg = config(dry, args)
    cfg["peak_TBps"] = args.peak_tbps  # replaced by the machine section's table look-up
    cfg["inject"] = {}
    for item in args.inject_failure:
        name, _, how = item.partition("=")
        if name not in SECTIONS or how not in ("error", "hang"):
            parser.error(f"--inject-failure expects SECTION=error|hang, got {item!r}")
        cfg["inject"][name] = how
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-dry-run to check the plumbing", file=sys.stderr)
            return 2
    started = time.monotonic()
    result: dict[str, Any] = {
        "script": "scripts/gpu_check.py",
        "format": 1,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry,
        "config": cfg,
        "machine": {},
        "sections": {},
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in SECTIONS:
            if name not in chosen:
                continue
            if dry and name in CUDA_ONLY:
                result["sections"][name] = {
                    "status": "skipped",
                    "reason": "needs CUDA (--cpu-dry-run)",
                }
                continue
            left = args.time_limit - (time.monotonic() - started)
            budget = min(budgets[name], left)
            if budget < 5:
                result["sections"][name] = {
                    "status": "skipped",
                    "reason": "the run's time limit is spent",
                }
                continue
            print(f"== {name} (budget {budget:.0f} s)", flush=True)
            status, rows, machine = run_section(name, cfg, budget, dry, Path(tmp))
            if machine is not None:
                result["machine"] = machine
                cfg["peak_TBps"] = machine.get("peak_TBps", args.peak_tbps)
            result["sections"][name] = status
            result["rows"].extend(rows)
    result["wall_s"] = round(time.monotonic() - started, 1)
    if args.out is None:
        name = "gpu_check_dry_run.json" if dry else "gpu_check.json"
        args.out = ROOT / "benchmarks" / "results" / name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    print(summary(result))
    print(f"wrote {args.out}")
    return 0


def summary(result: dict[str, Any]) -> str:
    """A short human-readable report of the JSON."""
    lines = ["", "== summary"]
    m = result["machine"]
    lines.append(
        f"machine: {m.get('gpu', 'no GPU')} driver {m.get('driver')} torch {m.get('torch')} "
        f"CUDA {m.get('torch_cuda')} triton {m.get('triton')}; peak {m.get('peak_TBps')} TB/s "
        f"(table entry {m.get('peak_from')!r})"
    )
    for name, st in result["sections"].items():
        extra = st.get("reason") or (st.get("error") or "").strip().splitlines()[-1:] or ""
        wall, count = st.get("wall_s", 0.0), st.get("rows", 0)
        lines.append(f"{name:13s} {st['status']:8s} {wall:7.1f} s {count:4d} rows  {extra}")
    rows = result["rows"]
    tests = [r for r in rows if r["section"] == "cuda_tests"]
    if tests:
        counts: dict[str, int] = {}
        for r in tests:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        lines.append(f"cuda tests: {counts}")
    for r in rows:
        if r["section"] == "kernel" and "error" not in r:
            frac = r.get("achieved_over_peak")
            lines.append(
                f"kernel {r['backend']:8s} V={r['V']:6d} {r['dtype']:8s} {r['median_ms']:8.3f} ms "
                f"max_rel_err {r['max_rel_err']:.1e} eff {r['effective_TBps']:.2f} TB/s"
                + (f" achieved {r['achieved_TBps']:.2f} TB/s" if r.get("achieved_TBps") else "")
                + (f" = {frac:.0%} of peak" if frac else "")
            )
        elif r["section"] == "kernel_sweep" and r.get("summary"):
            lines.append(
                f"sweep V={r['V']} {r['dtype']}: table {r['table_config']} best {r['best_config']} "
                f"table/best time {r['table_over_best_time']:.2f}"
            )
        elif r["section"] == "products" and "error" not in r:
            lines.append(
                f"products {r['kind']:10s} {r['mode']:5s} block {r['block']:3d}: "
                f"{r['per_vector_ms']:9.2f} ms/vector = {r['over_train_step']:.2f} x train step"
            )
        elif r["section"] == "memory":
            lines.append(f"memory {json.dumps({k: v for k, v in r.items() if k != 'section'})}")
        elif "error" in r:
            lines.append(f"{r['section']} error: {r['error'][:200]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

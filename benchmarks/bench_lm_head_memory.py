"""Peak memory of GGN, empirical Fisher and Hessian products on a language model vs a training step.

Model: a GPT-2 (HuggingFace, from ``GPT2Config``: 2 layers, d = 64, 4 heads, V = 50257,
random weights, float32, eval mode), so that the ``(tokens, V)`` logits dominate. One
batch of ``--tokens`` tokens (sequences of 256) with labels. Each product runs with the
LM head chunked over tokens (``lm_head="auto"``, the default) and unchunked
(``lm_head="off"``, the products before chunking existed):

* ``train``: ``model(**batch).loss.backward()`` with the gradients already allocated (a
  step of a training loop; the baseline);
* ``ggn``: ``GGNOperator(model, data, hf_lm_forward, hf_lm_loss_of_output(fused="eager"))``;
* ``fisher``: ``EmpiricalFisherOperator(model, data, hf_lm_per_sample_loss())``;
* ``hessian``: ``HessianOperator(model, data, hf_lm_loss())`` (autograd).

Memory: every measurement runs in a FRESH child process, which builds everything, runs
the operation once (warm-up: lazy initialisation, autodiff probes, allocator pools), then
resets the resident-set high-water mark (``/proc/self/clear_refs``), runs it again and
reports ``VmHWM - VmRSS before the run``: the extra memory the operation needed at its
peak (``tracemalloc`` does not see torch's allocations). glibc is told to return large
blocks to the OS (``MALLOC_MMAP_THRESHOLD_=65536``), so freed memory leaves the RSS.
Children of all operations are interleaved, ``--repeats`` rounds; the median is
reported with its ratio to the training step of the same round set.

Usage::

    python benchmarks/bench_lm_head_memory.py                    # 1024 and 4096 tokens
    python benchmarks/bench_lm_head_memory.py --tokens 1024 --repeats 1

Appends rows (machine, versions, configuration) to
``benchmarks/results/lm_head_memory.json`` and rewrites
``docs/benchmarks/lm_head_memory.md`` (``--page-only`` rewrites the page from the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lm_head_memory.json"
PAGE = ROOT / "docs" / "benchmarks" / "lm_head_memory.md"
OPS = [
    "train",
    "ggn",
    "ggn_off",
    "fisher",
    "fisher_off",
    "hessian",
    "hessian_off",
]
SEQ = 256


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(op: str, tokens: int, vocab: int, width: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from hessian_eigenthings import EmpiricalFisherOperator, GGNOperator, HessianOperator
    from hessian_eigenthings.loss_fns.huggingface import (
        hf_lm_forward,
        hf_lm_loss,
        hf_lm_loss_of_output,
        hf_lm_per_sample_loss,
    )

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=SEQ,
        n_embd=width,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, vocab, (max(tokens // SEQ, 1), SEQ))
    batch = {"input_ids": ids, "labels": ids.clone()}
    data = [batch]
    mode = "off" if op.endswith("_off") else "auto"
    kind = op.removesuffix("_off")
    if kind == "train":
        for p in model.parameters():
            p.grad = torch.zeros_like(p)

        def run() -> None:
            model(**batch).loss.backward()

    else:
        if kind == "ggn":
            operator: Any = GGNOperator(
                model,
                data,
                hf_lm_forward,
                hf_lm_loss_of_output(fused="eager"),
                lm_head=mode,
                check_determinism=False,
            )
        elif kind == "fisher":
            operator = EmpiricalFisherOperator(
                model, data, hf_lm_per_sample_loss(), lm_head=mode, check_determinism=False
            )
        else:
            operator = HessianOperator(
                model, data, hf_lm_loss(), lm_head=mode, check_determinism=False
            )
        v = torch.randn(operator.size)

        def run() -> None:
            operator.matvec(v)

    run()  # warm-up
    before = _kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    peak = _kib("VmHWM")
    return {
        "op": op,
        "peak_extra_mib": (peak - before) / 1024,
        "rss_before_mib": before / 1024,
        "seconds": seconds,
        "params": sum(p.numel() for p in model.parameters()),
        "logits_fp32_mib": ids.numel() * vocab * 4 / 2**20,
    }


def _spawn(op: str, tokens: int, vocab: int, width: int, threads: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, __file__, "--child", op, "--tokens", str(tokens)]
    cmd += ["--vocab", str(vocab), "--width", str(width)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {op} ({tokens} tokens) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _page(rows: list[dict[str, Any]]) -> str:
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for r in rows:
        latest[(r["config"]["tokens"], r["op"])] = r
    tokens_list = sorted({t for t, _ in latest})
    any_row = next(iter(latest.values()))
    cfg, machine = any_row["config"], any_row["machine"]
    lines = [
        "# Language-model products: memory with the LM head chunked",
        "",
        "Extra peak resident memory of one product on a GPT-2-shaped model (2 layers, "
        f"d = {cfg['width']}, V = {cfg['vocab']}, {any_row['params']:,} parameters, float32, "
        "random weights), against one training step (forward and backward of the same loss, "
        'gradients already allocated). `chunked` is the default (`lm_head="auto"`: the '
        "model runs up to the head's input and the head and the loss are applied "
        f"{(1 << 22) // cfg['vocab']} tokens at a time); `unchunked` is "
        '`lm_head="off"`, the products as they were before. Every number is the median '
        f"of {cfg['repeats']} fresh processes (warm-up run, then the high-water mark of a "
        "second run above the memory before it; `VmHWM` reset through "
        "`/proc/self/clear_refs`).",
        "",
        "| tokens | fp32 logits | product | chunked | x train | unchunked | x train |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in tokens_list:
        train = latest[(t, "train")]
        lines.append(
            f"| {t} | {train['logits_fp32_mib']:.0f} MiB | training step | "
            f"{train['peak_extra_mib']:.0f} MiB | 1.00 | | |"
        )
        for kind, label in (("ggn", "GGN"), ("fisher", "empirical Fisher"), ("hessian", "Hessian")):
            on, off = latest.get((t, kind)), latest.get((t, f"{kind}_off"))
            if on is None or off is None:
                continue
            lines.append(
                f"| {t} | | {label} | {on['peak_extra_mib']:.0f} MiB | "
                f"{on['ratio_to_train']:.2f} | {off['peak_extra_mib']:.0f} MiB | "
                f"{off['ratio_to_train']:.2f} |"
            )
    lines += [
        "",
        f"Machine: {machine['processor']} ({machine['platform']}), {machine['cpu_count']} "
        f"cores, {cfg['threads']} torch thread(s), Python {machine['python']}, torch "
        f"{machine['torch']}, transformers {machine['transformers']}. Reproduce with "
        "`python benchmarks/bench_lm_head_memory.py`; raw rows (every run, with times) in "
        "`benchmarks/results/lm_head_memory.json`.",
        "",
        "Reading the results: unchunked, the GGN and Hessian products hold several "
        "`(tokens, V)` tensors at once (logits, their tangent, the loss's product, the "
        "double-backward graph), more than a training step. Chunked, the head costs "
        "`O(chunk x V)` whatever the number of tokens; what remains grows with the tokens "
        "only through the trunk's activations (tiny here: d = 64) and is otherwise "
        "parameter-sized vectors (the direction, the product, the head's weight product; "
        "about 13 MiB each here). The training step itself keeps the `(tokens, V)` logits "
        "and their gradient, so the ratios fall as the number of tokens grows.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--page-only", action="store_true", help="rewrite the page from the JSON")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(child(args.child, args.tokens[0], args.vocab, args.width)))
        return
    if args.page_only:
        PAGE.write_text(_page(json.loads(RESULTS.read_text())))
        print(f"wrote {PAGE.relative_to(ROOT)}")
        return
    ops = args.ops.split(",")
    machine = _machine()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows: list[dict[str, Any]] = []
    print(f"{'tokens':>6} {'op':>12} {'peak MiB':>9} {'x train':>8} {'s':>7}")
    for tokens in args.tokens:
        runs: dict[str, list[dict[str, Any]]] = {op: [] for op in ops}
        for _ in range(args.repeats):  # interleaved: one child of every op per round
            for op in ops:
                runs[op].append(_spawn(op, tokens, args.vocab, args.width, args.threads))
        train = statistics.median(r["peak_extra_mib"] for r in runs["train"])
        for op in ops:
            peak = statistics.median(r["peak_extra_mib"] for r in runs[op])
            row = {
                "benchmark": "lm_head_memory",
                "timestamp": stamp,
                "op": op,
                "config": {
                    "tokens": tokens,
                    "vocab": args.vocab,
                    "width": args.width,
                    "layers": 2,
                    "seq": SEQ,
                    "dtype": "float32",
                    "repeats": args.repeats,
                    "threads": args.threads,
                },
                "params": runs[op][0]["params"],
                "logits_fp32_mib": runs[op][0]["logits_fp32_mib"],
                "peak_extra_mib": peak,
                "peak_extra_mib_runs": [r["peak_extra_mib"] for r in runs[op]],
                "ratio_to_train": peak / train,
                "seconds_runs": [r["seconds"] for r in runs[op]],
                "memory_method": "fresh child: VmHWM after clear_refs minus VmRSS before",
                "machine": machine,
            }
            rows.append(row)
            print(
                f"{tokens:>6} {op:>12} {peak:>9.1f} {row['ratio_to_train']:>8.2f} "
                f"{statistics.median(row['seconds_runs']):>7.2f}"
            )
    if args.no_save:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(old + rows, indent=1) + "\n")
    PAGE.write_text(_page(old + rows))
    print(
        f"appended {len(rows)} rows to {RESULTS.relative_to(ROOT)}; wrote {PAGE.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()

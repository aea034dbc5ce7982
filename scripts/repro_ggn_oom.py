"""Peak memory of one GGN matvec on a language model versus one training step.

A GGN product ``J^T H J v`` on a language model touches ``(N, V)`` logits several times
(the forward-mode tangent, the output, ``H_loss`` applied to the tangent, the VJP), and
large vocabularies make those tensors the dominant cost: a GGN that needs far more than
a training step runs out of memory where training does not. This script measures, each in
a fresh child process, the extra peak resident memory (RSS high-water mark from
``/proc/self/status`` VmHWM, reset with ``/proc/self/clear_refs``; glibc returns large
blocks to the OS through ``MALLOC_MMAP_THRESHOLD_``; never tracemalloc) of

* ``train``: forward + loss + backward of a GPT-2 (HuggingFace, from a config);
* ``ggn_eager`` / ``ggn_compile``: one ``GGNOperator`` matvec with the eager or compiled
  fused cross-entropy HVP;
* ``hessian``: one ``HessianOperator`` matvec (double backward), for comparison;
* ``head_materialised`` / ``head_chunked``: the GGN product of the LM head alone,
  ``linear_ce_ggn_product`` with one chunk of all ``N`` tokens (the ``(N, V)`` logits
  materialised) versus chunks of ``--chunk`` tokens.

The operators run with ``lm_head="off"``: this script reproduces the unchunked products
(the problem); ``benchmarks/bench_lm_head_memory.py`` measures the default, the LM head
chunked over tokens, against them.

Each child first runs the same computation once (warm-up: lazy initialisation,
compilation), then resets the high-water mark and measures a second run. Rows with
machine and versions are appended to ``benchmarks/results/repro_ggn_oom.json``.

    python scripts/repro_ggn_oom.py                 # V=50257, 512 tokens, ~3 min on 2 cores
    python scripts/repro_ggn_oom.py --vocab 32000 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "repro_ggn_oom.json"
MODES = ["train", "ggn_eager", "ggn_compile", "hessian", "head_materialised", "head_chunked"]


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(mode: str, vocab: int, tokens: int, width: int, chunk: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from hessian_eigenthings import GGNOperator, HessianOperator
    from hessian_eigenthings.loss_fns.fused_ce import linear_ce_ggn_product
    from hessian_eigenthings.loss_fns.huggingface import (
        hf_lm_forward,
        hf_lm_loss,
        hf_lm_loss_of_output,
    )

    torch.manual_seed(0)
    seq = 128
    rows = max(tokens // seq, 1)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=seq,
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
    ids = torch.randint(0, vocab, (rows, seq))
    batch = {"input_ids": ids, "labels": ids.clone()}
    data = [batch]

    if mode == "train":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def run():
            opt.zero_grad(set_to_none=False)
            model(**batch).loss.backward()

    elif mode.startswith("ggn"):
        fused = "eager" if mode == "ggn_eager" else "compile"
        op = GGNOperator(
            model,
            data,
            hf_lm_forward,
            hf_lm_loss_of_output(fused=fused),
            check_determinism=False,
            lm_head="off",
        )
        v = torch.randn(op.size)

        def run():
            op @ v

    elif mode == "hessian":
        op = HessianOperator(model, data, hf_lm_loss(), check_determinism=False, lm_head="off")
        v = torch.randn(op.size)

        def run():
            op @ v

    else:
        with torch.no_grad():
            hidden = model.transformer(input_ids=ids).last_hidden_state.detach()
        weight = model.lm_head.weight.detach()
        d_weight = torch.randn_like(weight)
        target = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
        size = hidden.shape[0] * hidden.shape[1] if mode == "head_materialised" else chunk

        def run():
            linear_ce_ggn_product(
                hidden, weight, target, d_weight=d_weight, chunk_size=size, backend="eager"
            )

    run()  # warm-up
    before = _kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    peak = _kib("VmHWM")
    n_tok = rows * seq
    print(
        json.dumps(
            {
                "mode": mode,
                "vocab": vocab,
                "tokens": n_tok,
                "width": width,
                "chunk": chunk if mode == "head_chunked" else None,
                "peak_extra_MiB": (peak - before) / 1024,
                "logits_fp32_MiB": n_tok * vocab * 4 / 2**20,
                "params": sum(p.numel() for p in model.parameters()),
                "seconds": seconds,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", metavar="MODE")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.vocab, args.tokens, args.width, args.chunk)
        return
    import torch

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    rows = []
    for mode in args.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--vocab",
            str(args.vocab),
            "--tokens",
            str(args.tokens),
            "--width",
            str(args.width),
            "--chunk",
            str(args.chunk),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"child {mode} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    train = next((r for r in rows if r["mode"] == "train"), None)
    logits = rows[0]["logits_fp32_MiB"]
    print(
        f"GPT-2, V={args.vocab}, {rows[0]['tokens']} tokens, (N, V) fp32 logits = {logits:.0f} MiB"
    )
    print(f"{'mode':18} {'peak extra MiB':>15} {'x logits':>9} {'x train':>8} {'s':>7}")
    for r in rows:
        ratio = r["peak_extra_MiB"] / train["peak_extra_MiB"] if train else float("nan")
        print(
            f"{r['mode']:18} {r['peak_extra_MiB']:15.1f} "
            f"{r['peak_extra_MiB'] / logits:9.2f} {ratio:8.2f} {r['seconds']:7.2f}"
        )
    meta = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    old.extend({**meta, **r} for r in rows)
    RESULTS.write_text(json.dumps(old, indent=1) + "\n")
    print(f"appended {len(rows)} rows to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""Hessian and GGN eigenvalues of a tiny GPT-2 (HuggingFace, built from a config).

Builds a 2-layer GPT-2 from ``GPT2Config`` (no download), trains it for a few steps on a
synthetic next-token task (sequences that repeat a random prefix, right-padded with
``-100`` labels), then computes, for the token-mean loss over the whole dataset,

* the top Hessian eigenvalues (``HessianOperator`` + ``hf_lm_loss``), and
* the top Generalized Gauss-Newton eigenvalues (``GGNOperator`` + ``hf_lm_forward`` +
  ``hf_lm_loss_of_output``, whose ``.hvp`` is the fused cross-entropy HVP),

with restarted Lanczos. The model keeps HuggingFace's default attention ("sdpa"); the
operators run it with the math SDPA backend. Batches are weighted by their numbers of
non-ignored tokens. In float64 the example also checks one Hessian-vector product against
a central difference of gradients.

    python examples/huggingface_tiny_gpt2.py          # ~30 s on a laptop CPU
    python examples/huggingface_tiny_gpt2.py --fast   # a few seconds (CI)
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, GPT2Config

from hessian_eigenthings import GGNOperator, HessianOperator
from hessian_eigenthings.algorithms.lanczos import lanczos
from hessian_eigenthings.loss_fns.huggingface import (
    hf_lm_forward,
    hf_lm_loss,
    hf_lm_loss_of_output,
    hf_token_count,
)

VOCAB = 16


def make_batches(num_batches: int, rows: int, length: int, seed: int) -> list[dict]:
    """Sequences ``prefix + prefix`` (the second half is predictable), right-padded."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        half = length // 2
        prefix = torch.randint(1, VOCAB, (rows, half), generator=gen)
        ids = torch.cat([prefix, prefix], 1)
        pad = torch.randint(0, half, (rows,), generator=gen)  # ragged: 0..half-1 padded
        keep = torch.arange(ids.shape[1]) < (ids.shape[1] - pad)[:, None]
        labels = torch.where(keep, ids, torch.full_like(ids, -100))
        batches.append(
            {"input_ids": ids, "attention_mask": keep.long(), "labels": labels},
        )
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny sizes for CI")
    args = parser.parse_args()
    torch.manual_seed(0)
    width, layers, steps, k = (8, 1, 20, 3) if args.fast else (32, 2, 200, 5)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config).to(torch.float64)
    print(
        f"GPT-2: {sum(p.numel() for p in model.parameters())} parameters, attention "
        f"implementation {model.config._attn_implementation!r}"
    )
    data = make_batches(4, 8, 12, seed=1)
    print("tokens per batch:", [int(hf_token_count(b)) for b in data])

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = data[step % len(data)]
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    model.eval()
    print(f"training loss after {steps} steps: {loss.item():.4f}")

    loss_fn = hf_lm_loss(from_logits=True)  # float64 loss (HF's own computes in float32)
    hessian = HessianOperator(model, data, loss_fn)
    result = lanczos(hessian, k=k, which="LA", seed=0)
    print("top Hessian eigenvalues:", [f"{x:.5g}" for x in result.eigenvalues.tolist()])
    print(
        "  relative residuals:",
        [f"{r:.1e}" for r in (result.residuals / result.eigenvalues.abs()).tolist()],
    )

    # "auto": Triton on CUDA, torch.compile on CPU (compiling takes a few seconds once)
    fused = "eager" if args.fast else "auto"
    ggn = GGNOperator(model, data, hf_lm_forward, hf_lm_loss_of_output(fused=fused))
    g_result = lanczos(ggn, k=k, which="LA", seed=0)
    print("top GGN eigenvalues:    ", [f"{x:.5g}" for x in g_result.eigenvalues.tolist()])

    # check: Rayleigh quotient of the top Hessian eigenvector and a central difference
    v = result.eigenvectors[0].to(torch.float64)
    hv = hessian @ v
    fd = HessianOperator(model, data, loss_fn, method="finite_difference") @ v
    print(
        f"v^T H v = {float(v @ hv):.5g}; |Hv - FD(Hv)| / |Hv| = "
        f"{float((hv - fd).norm() / hv.norm()):.1e}"
    )


if __name__ == "__main__":
    main()

"""Top Hessian eigenvalues of an attention-only transformer (TransformerLens).

Builds an attention-only ``HookedTransformer`` from a ``HookedTransformerConfig`` (no
download), trains it for a few steps on sequences that repeat a random prefix (the
second half is solvable by an induction-style copy), then computes, for the token-mean
loss over the dataset, the top eigenvalues of

* the Hessian with respect to all parameters, and
* the Hessian restricted to each layer's attention weights (``blocks.{i}.attn.W_*``),

with restarted Lanczos. On the tiny ``--fast`` model it also checks the restricted
eigenvalues against the dense float64 Hessian of the same block.

    python examples/transformer_lens_attention_only.py          # ~1 min on a laptop CPU
    python examples/transformer_lens_attention_only.py --fast   # a few seconds (CI)
"""

from __future__ import annotations

import argparse
import warnings

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from hessian_eigenthings import HessianOperator
from hessian_eigenthings.algorithms.lanczos import lanczos
from hessian_eigenthings.loss_fns.transformer_lens import tlens_loss

VOCAB = 12


def make_batches(num_batches: int, rows: int, length: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        prefix = torch.randint(0, VOCAB, (rows, length // 2), generator=gen)
        out.append(torch.cat([prefix, prefix], 1))
    return out


def dense_block_hessian(model, data, names) -> torch.Tensor:
    """Dense float64 Hessian of the dataset token-mean loss w.r.t. ``names`` (tiny models)."""
    params = dict(model.named_parameters())
    base = [params[n].detach() for n in names]
    counts = [b.shape[0] * (b.shape[1] - 1) for b in data]

    def mean_loss(*flat):
        state = dict(zip(names, flat))
        total = sum(
            c * torch.func.functional_call(model, state, (b,), {"return_type": "loss"})
            for c, b in zip(counts, data)
        )
        return total / sum(counts)

    blocks = torch.autograd.functional.hessian(mean_loss, tuple(base))
    sizes = [p.numel() for p in base]
    return torch.cat(
        [
            torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(base))], 1)
            for i in range(len(base))
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny sizes for CI")
    args = parser.parse_args()
    layers, d_model, steps, k = (1, 8, 30, 3) if args.fast else (2, 32, 300, 5)
    cfg = HookedTransformerConfig(
        n_layers=layers,
        d_model=d_model,
        n_ctx=16,
        d_head=4,
        n_heads=2,
        d_vocab=VOCAB,
        attn_only=True,
        act_fn=None,
        normalization_type="LN",
        dtype=torch.float64,
        device="cpu",
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TL 3.x deprecates the class
        model = HookedTransformer(cfg)
    data = make_batches(4, 8, 12, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        optimizer.zero_grad()
        loss = model(data[step % len(data)], return_type="loss")
        loss.backward()
        optimizer.step()
    model.eval()
    print(
        f"attention-only transformer, {layers} layer(s), "
        f"{sum(p.numel() for p in model.parameters())} parameters; "
        f"loss after {steps} steps: {loss.item():.4f}"
    )

    full = lanczos(HessianOperator(model, data, tlens_loss()), k=k, which="LM", seed=0)
    print("top |eigenvalues| of the full Hessian:", [f"{x:.5g}" for x in full.eigenvalues.tolist()])

    for layer in range(layers):
        H = HessianOperator(model, data, tlens_loss(), param_filter=[f"blocks.{layer}.attn.W_*"])
        res = lanczos(H, k=k, which="LM", seed=0)
        print(
            f"layer {layer} attention weights ({H.size} params): "
            f"{[f'{x:.5g}' for x in res.eigenvalues.tolist()]}, "
            f"converged {res.converged.tolist()}"
        )
        if args.fast:
            names = [n for n, _ in H.named_params]
            dense = torch.linalg.eigvalsh(dense_block_hessian(model, data, names))
            want = dense[dense.abs().argsort(descending=True)[:k]]
            err = float((res.eigenvalues - want).abs().max() / want.abs().max())
            print(
                f"  dense float64 check: {[f'{x:.5g}' for x in want.tolist()]}, "
                f"max relative difference {err:.1e}"
            )


if __name__ == "__main__":
    main()

"""The shared benchmark problems and their dense float64 ground truth.

Every library in ``compare_peers.py`` sees exactly the same problem: the same model (same
weights), the same list of batches and the same loss. Each batch is a pair ``(X, y)`` of
tensors, ``model(X)`` returns an ``(N, C)`` logit matrix and ``criterion(model(X), y)`` is the
mean cross-entropy of the batch, which is the form every peer accepts (curvlinops wants a
``(X, y)`` loader and a loss module with ``reduction``; PyHessian calls
``criterion(model(X.to(device)), y)``).

Problems:
    ``mlp_digits``: scikit-learn's bundled 8x8 digits (no download), 64 -> h -> 10 MLP with a
        LayerNorm (where HVP mistakes in normalisation layers show), trained a few steps.
    ``cnn_digits``: the same digits as 1x8x8 images, two 3x3 convolutions and a linear head.
    ``mlp_wide``: a 1.1M-parameter MLP on all digits in one batch, for time and memory only.
    ``gpt2_tiny``: a one-layer GPT-2 built from a config (transformers; no hub), a batch of
        sequences of different lengths, right-padded, labels ``-100`` on the padding. ``X``
        stacks ``input_ids`` and ``attention_mask`` into one ``(B, 2, T)`` tensor so that every
        peer can move it with ``X.to(device)``; the model returns the shifted next-token logits
        of all positions, flattened to ``(B * (T - 1), V)``.

The module imports only torch, numpy, scikit-learn and (optionally) transformers, never
``hessian_eigenthings``: the driver of the original 1.0.0a5 release imports it too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

PROBLEMS = ("mlp_digits", "cnn_digits", "gpt2_tiny")

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass
class Problem:
    """One benchmark problem: model, data and loss, shared by every library.

    Attributes:
        name: Problem name (one of :data:`PROBLEMS`).
        model: ``model(X) -> (N, C)`` logits.
        batches: List of ``(X, y)`` batches; the loss of the problem is the mean over all
            (non-ignored) targets of all batches.
        criterion: ``nn.CrossEntropyLoss`` (mean reduction; ``ignore_index=-100``).
        description: One line for the report.
        config: Sizes used to build it (goes into the JSON).
    """

    name: str
    model: nn.Module
    batches: list[Batch]
    criterion: nn.CrossEntropyLoss
    description: str
    config: dict[str, Any]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def batch_weight(self, batch: Batch) -> int:
        """Number of targets that count in the mean loss of ``batch``."""
        return int((batch[1] != self.criterion.ignore_index).sum())

    @property
    def total_weight(self) -> int:
        return sum(self.batch_weight(b) for b in self.batches)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``loss_fn(model, batch)``: mean loss of one batch."""
        x, y = batch
        return self.criterion(model(x), y)

    def mean_loss(self) -> torch.Tensor:
        """The problem's loss: target-weighted mean of the batch losses (a graph)."""
        total = self.total_weight
        terms = [self.loss(self.model, b) * (self.batch_weight(b) / total) for b in self.batches]
        return torch.stack(terms).sum()

    def flat_grad(self) -> torch.Tensor:
        """Exact gradient of :meth:`mean_loss`, flattened (the timing baseline's work)."""
        grads = torch.autograd.grad(self.mean_loss(), self.params)
        return torch.cat([g.reshape(-1) for g in grads])


def set_threads(n: int = 1) -> None:
    """Pin torch to ``n`` intra-op threads so timings are comparable on a shared machine."""
    torch.set_num_threads(n)


def _digits(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    x = np.asarray(data.data[:n], dtype=np.float64) / 16.0
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 0.1)
    y = np.asarray(data.target[:n], dtype=np.int64)
    return torch.tensor(x, dtype=dtype), torch.tensor(y)


def _split(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[Batch]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def _train(model: nn.Module, batches: list[Batch], steps: int, lr: float) -> None:
    """A few full-batch Adam steps so the Hessian is that of a partly trained model."""
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        total = sum(int((b[1] != -100).sum()) for b in batches)
        terms = [crit(model(x), y) * (int((y != -100).sum()) / total) for x, y in batches]
        torch.stack(terms).sum().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def _mlp(smoke: bool, dtype: torch.dtype, ragged: bool) -> Problem:
    n, hidden, bs = (512, 16, 256) if smoke else (1024, 32, 512)
    if ragged:  # same model, batches of 512 with a short last one
        n, bs = (448, 192) if smoke else (1797, 512)
    torch.manual_seed(0)
    x, y = _digits(n, torch.float64)
    model = nn.Sequential(
        nn.Linear(64, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, 10)
    ).double()
    batches = _split(x, y, bs)
    _train(model, batches, steps=60, lr=1e-2)
    model = model.to(dtype)
    batches = [(xb.to(dtype), yb) for xb, yb in batches]
    return Problem(
        name="mlp_digits_ragged" if ragged else "mlp_digits",
        model=model,
        batches=batches,
        criterion=nn.CrossEntropyLoss(),
        description=(
            f"digits MLP 64-{hidden}(LayerNorm, tanh)-10, {n} samples, batches of {bs}"
            + (" (last one short)" if ragged else "")
        ),
        config={"samples": n, "batch_size": bs, "hidden": hidden, "train_steps": 60},
    )


def _mlp_wide(dtype: torch.dtype) -> Problem:
    """All 1797 digits in one batch through a 64-1024(LayerNorm)-1024-10 tanh MLP.

    About 1.1M parameters and 7 MiB per activation layer: big enough that time and memory
    measure the products themselves rather than per-call overheads. No dense truth.
    """
    torch.manual_seed(4)
    x, y = _digits(1797, torch.float64)
    model = nn.Sequential(
        nn.Linear(64, 1024),
        nn.LayerNorm(1024),
        nn.Tanh(),
        nn.Linear(1024, 1024),
        nn.Tanh(),
        nn.Linear(1024, 10),
    ).double()
    batches = [(x, y)]
    _train(model, batches, steps=5, lr=1e-3)
    model = model.to(dtype)
    return Problem(
        name="mlp_wide",
        model=model,
        batches=[(x.to(dtype), y)],
        criterion=nn.CrossEntropyLoss(),
        description="digits MLP 64-1024(LayerNorm, tanh)-1024(tanh)-10, 1797 samples, one batch",
        config={"samples": 1797, "batch_size": 1797, "hidden": [1024, 1024], "train_steps": 5},
    )


def _cnn(smoke: bool, dtype: torch.dtype) -> Problem:
    n, c1, c2, bs = (512, 2, 4, 256) if smoke else (512, 4, 8, 256)
    torch.manual_seed(1)
    x, y = _digits(n, torch.float64)
    x = x.reshape(n, 1, 8, 8)
    model = nn.Sequential(
        nn.Conv2d(1, c1, 3),
        nn.Tanh(),
        nn.Conv2d(c1, c2, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(c2 * 16, 10),
    ).double()
    batches = _split(x, y, bs)
    _train(model, batches, steps=60, lr=1e-2)
    model = model.to(dtype)
    batches = [(xb.to(dtype), yb) for xb, yb in batches]
    return Problem(
        name="cnn_digits",
        model=model,
        batches=batches,
        criterion=nn.CrossEntropyLoss(),
        description=f"digits CNN conv3x3({c1})-tanh-conv3x3({c2})-tanh-linear, {n} samples, "
        f"batches of {bs}",
        config={"samples": n, "batch_size": bs, "channels": [c1, c2], "train_steps": 60},
    )


class NextTokenLogits(nn.Module):
    """GPT-2 wrapper: ``X = stack(input_ids, attention_mask)`` -> shifted flat logits."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1])


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _gpt2(smoke: bool, dtype: torch.dtype) -> Problem:
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab, embd, seqs, seq_len = (16, 8, 8, 8) if smoke else (32, 16, 16, 12)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=seq_len,
        n_embd=embd,
        n_layer=1,
        n_head=2,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(2)
    lm = GPT2LMHeadModel(cfg).double().eval()
    model = NextTokenLogits(lm)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (seqs, seq_len), generator=gen)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (seqs,), generator=gen)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad token 0 on the right
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))[:, 1:].reshape(-1)
    x = torch.stack([ids, mask], dim=1)
    batches = [(x, labels)]
    _train(model, batches, steps=30, lr=1e-2)
    model = model.to(dtype)
    return Problem(
        name="gpt2_tiny",
        model=model,
        batches=batches,
        criterion=nn.CrossEntropyLoss(ignore_index=-100),
        description=(
            f"GPT-2 1 layer, n_embd={embd}, vocab={vocab}, {seqs} sequences of length <= "
            f"{seq_len}, right-padded (labels -100)"
        ),
        config={
            "vocab": vocab,
            "n_embd": embd,
            "n_layer": 1,
            "sequences": seqs,
            "seq_len": seq_len,
            "lengths": lengths.tolist(),
        },
    )


def build(name: str, *, smoke: bool, dtype: torch.dtype = torch.float64) -> Problem:
    """Build problem ``name`` deterministically (same weights and data on every call).

    Args:
        name: One of :data:`PROBLEMS`, ``"mlp_digits_ragged"`` or ``"mlp_wide"`` (the same
            at either size).
        smoke: The reduced size used by ``--smoke`` (CI).
        dtype: Floating dtype of the model and inputs.

    Raises:
        ValueError: Unknown problem name.
        ImportError: ``gpt2_tiny`` without transformers installed.
    """
    if name == "mlp_digits":
        return _mlp(smoke, dtype, ragged=False)
    if name == "mlp_digits_ragged":
        return _mlp(smoke, dtype, ragged=True)
    if name == "cnn_digits":
        return _cnn(smoke, dtype)
    if name == "mlp_wide":
        return _mlp_wide(dtype)
    if name == "gpt2_tiny":
        return _gpt2(smoke, dtype)
    raise ValueError(f"Unknown problem {name!r}; expected one of {PROBLEMS}.")


def math_attention() -> Any:
    """Context forcing the math SDPA kernel (the fused CPU kernels have no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def flat_params(problem: Problem) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in problem.params])


def _set_flat(problem: Problem, flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in problem.params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def dense_hessian(problem: Problem, chunk: int = 1) -> torch.Tensor:
    """The dense Hessian of the problem's mean loss, by double backward against unit vectors.

    ``H[:, i] = d/dtheta <grad L(theta), e_i>`` for every coordinate ``i``; the gradient graph
    of each batch is built once and reused for all ``n`` columns. Computed in the problem's
    dtype (build the problem in float64 for a ground truth) and symmetrised,
    ``(H + H^T) / 2``, which only removes rounding.
    """
    params = problem.params
    n = problem.num_params
    dtype = params[0].dtype
    hess = torch.zeros(n, n, dtype=dtype)
    total = problem.total_weight
    for batch in problem.batches:
        w = problem.batch_weight(batch) / total
        with math_attention():
            loss = problem.loss(problem.model, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        for i in range(n):
            cols = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
            hess[i] += w * torch.cat(
                [
                    torch.zeros(p.numel(), dtype=dtype) if c is None else c.reshape(-1)
                    for c, p in zip(cols, params)
                ]
            )
    return (hess + hess.T) / 2


def dense_ggn(problem: Problem) -> torch.Tensor:
    r"""The dense generalized Gauss-Newton matrix of the problem's mean loss.

    .. math:: G = \sum_b \frac{w_b}{W} J_b^\top H_b J_b,

    with ``J_b`` the Jacobian of the batch's flattened logits with respect to the parameters
    (``torch.func.jacrev``) and ``H_b`` the Hessian of the batch's mean cross-entropy with
    respect to the logits (``torch.func.hessian``), both dense.
    """
    from torch.func import functional_call, hessian, jacrev

    names = [name for name, p in problem.model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in problem.params]
    sizes = [p.numel() for p in problem.params]
    theta = flat_params(problem)
    n = theta.numel()
    ggn = torch.zeros(n, n, dtype=theta.dtype)
    total = problem.total_weight

    def unflat(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: c.view(s) for name, c, s in zip(names, torch.split(t, sizes), shapes)}

    for x, y in problem.batches:

        def out_fn(t: torch.Tensor, x: torch.Tensor = x) -> torch.Tensor:
            return functional_call(problem.model, unflat(t), (x,)).reshape(-1)

        with torch.no_grad():
            out = problem.model(x)
        jac = jacrev(out_fn)(theta)

        def loss_of_out(o: torch.Tensor, shape: torch.Size = out.shape, y: Any = y) -> Any:
            return problem.criterion(o.view(shape), y)

        h_out = hessian(loss_of_out)(out.reshape(-1))
        w = problem.batch_weight((x, y)) / total
        ggn += w * jac.T @ h_out @ jac
    return (ggn + ggn.T) / 2


def fd_hvp(problem: Problem, v: torch.Tensor, h: float = 3e-4) -> torch.Tensor:
    r"""Hessian-vector product by a 4-point central difference of exact gradients.

    .. math::

        Hv \approx \|v\| \frac{-g(\theta + 2hu) + 8 g(\theta + hu) - 8 g(\theta - hu)
        + g(\theta - 2hu)}{12 h}, \quad u = v / \|v\|,

    exact up to ``O(h^4)`` (run it in float64). Uses only first-order autograd, so it is an
    independent oracle for double-backward HVPs through LayerNorm and attention. The
    parameters are restored exactly afterwards.
    """
    theta = flat_params(problem).clone()
    norm = v.norm()
    u = (v / norm).to(theta.dtype)
    grads = {}
    try:
        for s in (-2, -1, 1, 2):
            _set_flat(problem, theta + s * h * u)
            grads[s] = problem.flat_grad()
    finally:
        _set_flat(problem, theta)
    return norm * (-grads[2] + 8 * grads[1] - 8 * grads[-1] + grads[-2]) / (12 * h)


def probe_vector(problem: Problem, seed: int = 0) -> torch.Tensor:
    """A fixed Gaussian direction (float64, on CPU) used for HVP correctness and timing."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(problem.num_params, generator=gen, dtype=torch.float64)

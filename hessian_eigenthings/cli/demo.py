"""``hessian-eigenthings demo``: the library's main job on data that ships with scikit-learn.

Trains a small MLP on the 8x8 handwritten digits bundled with scikit-learn (1,797 images,
10 classes; no download) for a few seconds, then computes, for the mean cross-entropy
over the training set (ragged batches weighted by their sizes):

- ``k`` eigenvalues of the Hessian and of the Generalized Gauss-Newton matrix at the
  ``--which`` end (default ``LM``, largest magnitude of either sign; restarted Lanczos,
  with their residual norms ``||A v - lambda v||``),
- the Hessian trace by Hutch++ with its standard error,
- the Hessian spectral density by Stochastic Lanczos Quadrature, and from everything
  above both ends of the Hessian spectrum found and its negative mass,

prints them, and writes ``OUT/results.json``, ``OUT/eigenvalues.png``,
``OUT/spectrum.png`` and the trained weights ``OUT/model.pt`` (a ``state_dict``, so every
number can be checked independently).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hessian_eigenthings.cli.errors import BadInput
from hessian_eigenthings.cli.progress import Reporter
from hessian_eigenthings.cli.report import environment, write_json
from hessian_eigenthings.cli.summary import (
    WHICH_WORDS,
    both_ends,
    error_bar_hint,
    plural,
)

__all__ = ["DemoData", "load_digits_data", "run_demo", "train_classifier"]

HIDDEN = 32
TRAIN_STEPS = 300
BATCH_SIZE = 256
TRACE_MATVECS = 90
SLQ_RUNS = 6
SLQ_STEPS = 50


class DemoData:
    """Digits split into a training and a test set, features scaled to ``[0, 1]``.

    Attributes:
        x_train, y_train, x_test, y_test: Float features ``(N, 64)`` and int64 labels.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(x.shape[0], generator=gen)
        n_train = int(0.8 * x.shape[0])
        tr, te = perm[:n_train], perm[n_train:]
        self.x_train, self.y_train = x[tr], y[tr]
        self.x_test, self.y_test = x[te], y[te]

    def train_batches(
        self, batch_size: int = BATCH_SIZE
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training set as a list of ``(x, y)`` batches; the last one is ragged."""
        return [
            (self.x_train[i : i + batch_size], self.y_train[i : i + batch_size])
            for i in range(0, self.x_train.shape[0], batch_size)
        ]


def load_digits_data(seed: int) -> DemoData:
    """Load scikit-learn's bundled digits (no download) and split 80/20 with ``seed``.

    Raises:
        BadInput: scikit-learn is not installed (the ``demo`` extra).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise BadInput(
            "the demo needs scikit-learn's bundled digits dataset: "
            "pip install 'hessian-eigenthings[demo]'"
        ) from err
    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    return DemoData(x, y, seed)


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on one batch (the demo's ``loss_fn``)."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def logits(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The model output on one batch (the GGN's ``forward_fn``)."""
    return model(batch[0])


def train_classifier(data: DemoData, seed: int, steps: int = TRAIN_STEPS) -> nn.Module:
    """Train a 64-32-10 tanh MLP with full-batch Adam; returns it in eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = (data.x_train, data.y_train)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        cross_entropy(model, batch).backward()
        opt.step()
    model.eval()
    return model


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


def _eigen_table(reporter: Reporter, k: int, hess: Any, ggn: Any) -> None:
    reporter.say(
        f"Top-{k} eigenvalues, {WHICH_WORDS[hess.which]} (Lanczos; residual = "
        "||A v - lambda v||; * = not converged):"
    )
    reporter.say(f"  {'i':>2}  {'Hessian':>12} {'residual':>10}   {'GGN':>12} {'residual':>10}")

    def cell(result: Any, i: int) -> str:
        star = " " if bool(result.converged[i]) else "*"
        return f"{float(result.eigenvalues[i]):>12.5g} {float(result.residuals[i]):>10.2e}{star}"

    for i in range(k):
        reporter.say(f"  {i + 1:>2}  {cell(hess, i)}  {cell(ggn, i)}".rstrip())


def _eigen_dict(result: Any) -> dict[str, Any]:
    return {
        "eigenvalues": result.eigenvalues,
        "residuals": result.residuals,
        "converged": result.converged,
        "iterations": result.iterations,
        "num_matvecs": result.num_matvecs,
        "which": result.which,
        "tol": result.tol,
        "seed": result.seed,
        "stop_reason": result.stop_reason,
    }


def _figures(
    density: Any,
    hess_eig: Any,
    ggn_eig: Any,
    figure: Path,
    eig_figure: Path,
    k: int,
    which: str,
    n_params: int,
) -> None:
    from hessian_eigenthings.cli.figures import save_eigenvalue_figure, save_spectrum_figure

    save_spectrum_figure(
        density,
        figure,
        eigenvalues={f"Hessian, {k} eigenvalues ({which}, Lanczos)": hess_eig.eigenvalues},
        title=f"Hessian spectral density of a digits MLP ({n_params:,} parameters)",
    )
    save_eigenvalue_figure(
        {"Hessian": hess_eig, "GGN": ggn_eig},
        eig_figure,
        title=f"{k} eigenvalues ({which}) of the Hessian and the GGN, with residuals",
    )


def run_demo(
    *, out: str | Path, k: int, seed: int, reporter: Reporter, which: str = "LM"
) -> dict[str, Any]:
    """Train, analyse, print, and write ``results.json`` and the figures under ``out``.

    Args:
        out: Output directory (created if needed).
        k: Number of eigenvalues of the Hessian and of the GGN.
        seed: Seed of the data split, the initialisation and every estimator.
        reporter: Where results and progress go.
        which: End of the spectrum (``"LM"``, ``"LA"``, ``"SA"``), as ``lanczos``.

    Returns:
        The results written to ``results.json``.
    """
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out {str(out_dir)!r} exists and is not a directory")
    # A 2,410-parameter model gains nothing from intra-op threads, and on a busy machine
    # their synchronisation costs 10-20x (measured: 10 ms vs 190 ms per Hessian product
    # with 2 threads on a loaded 2-core machine). Restored on exit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out_dir, k, seed, which, reporter)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: Path, k: int, seed: int, which: str, reporter: Reporter) -> dict[str, Any]:
    from hessian_eigenthings.algorithms.lanczos import lanczos
    from hessian_eigenthings.algorithms.spectral_density import spectral_density
    from hessian_eigenthings.algorithms.trace import trace
    from hessian_eigenthings.cli.figures import require_matplotlib
    from hessian_eigenthings.loss_fns.standard import cross_entropy_loss_of_output
    from hessian_eigenthings.operators.ggn import GGNOperator
    from hessian_eigenthings.operators.hessian import HessianOperator

    require_matplotlib()
    data = load_digits_data(seed)
    t0 = time.perf_counter()
    model = train_classifier(data, seed)
    train_time = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    batches = data.train_batches()
    if k > n_params:
        raise BadInput(f"--k {k} exceeds the number of parameters ({n_params})")
    with torch.no_grad():
        train_loss = float(cross_entropy(model, (data.x_train, data.y_train)))
    reporter.say(
        f"Trained a 64-{HIDDEN}-10 MLP ({n_params:,} parameters) on {data.x_train.shape[0]:,} "
        f"digits for {TRAIN_STEPS} Adam steps in {train_time:.1f} s: train loss "
        f"{train_loss:.4f}, train accuracy {_accuracy(model, data.x_train, data.y_train):.1%}, "
        f"test accuracy {_accuracy(model, data.x_test, data.y_test):.1%}."
    )
    sizes = [int(b[1].shape[0]) for b in batches]
    reporter.say(
        f"Curvature of the mean training loss over {plural(len(batches), 'batch')} of sizes "
        f"{sizes} (weighted by samples)."
    )

    hessian = HessianOperator(model, batches, cross_entropy)
    ggn = GGNOperator(model, batches, logits, cross_entropy_loss_of_output())

    timings: dict[str, float] = {"train": train_time}

    def timed(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with reporter.task(hessian, "Hessian eigenvalues") as op:
        hess_eig = lanczos(op, k, which=which, seed=seed)
    timed("hessian_eigen", t0)
    t0 = time.perf_counter()
    with reporter.task(ggn, "GGN eigenvalues") as op:
        ggn_eig = lanczos(op, k, which=which, seed=seed)
    timed("ggn_eigen", t0)
    _eigen_table(reporter, k, hess_eig, ggn_eig)

    t0 = time.perf_counter()
    with reporter.task(hessian, "Hessian trace", total=TRACE_MATVECS) as op:
        tr = trace(op, num_matvecs=TRACE_MATVECS, method="hutch++", seed=seed)
    timed("trace", t0)
    reporter.say(
        f"Hessian trace (Hutch++, {plural(TRACE_MATVECS, 'matvec')}): {float(tr.estimate):.5g} "
        f"+/- {float(tr.stderr):.2g} (one standard error)"
    )
    hint = error_bar_hint(
        "Hessian trace",
        float(tr.estimate),
        float(tr.stderr),
        "the demo's budget is fixed; trace(H, num_matvecs=...) takes more",
    )
    if hint:
        reporter.say(hint)
    t0 = time.perf_counter()
    with reporter.task(hessian, "Hessian spectral density", total=SLQ_RUNS * SLQ_STEPS) as op:
        density = spectral_density(op, num_runs=SLQ_RUNS, lanczos_steps=SLQ_STEPS, seed=seed)
    timed("density", t0)
    lines, ends = both_ends(
        "Hessian",
        eigen=hess_eig,
        density=density,
        density_remedy="the demo's budget is fixed; spectral_density(H, num_runs=...) takes more",
    )
    for line in lines:
        reporter.say(line)
    analysis_time = sum(timings[s] for s in ("hessian_eigen", "ggn_eigen", "trace", "density"))

    t0 = time.perf_counter()
    figure = out_dir / "spectrum.png"
    eig_figure = out_dir / "eigenvalues.png"
    if reporter.rank == 0:  # under torchrun every rank computes the same; rank 0 writes
        _figures(density, hess_eig, ggn_eig, figure, eig_figure, k, which, n_params)
    timed("figures", t0)
    results: dict[str, Any] = {
        "command": "demo",
        "seed": seed,
        "k": k,
        "model": {
            "architecture": f"Linear(64,{HIDDEN})-Tanh-Linear({HIDDEN},10)",
            "num_parameters": n_params,
            "train_steps": TRAIN_STEPS,
            "train_loss": train_loss,
            "train_accuracy": _accuracy(model, data.x_train, data.y_train),
            "test_accuracy": _accuracy(model, data.x_test, data.y_test),
        },
        "data": {
            "dataset": "sklearn.datasets.load_digits",
            "num_train": int(data.x_train.shape[0]),
            "num_test": int(data.x_test.shape[0]),
            "batch_sizes": sizes,
        },
        "hessian": _eigen_dict(hess_eig),
        "ggn": _eigen_dict(ggn_eig),
        "trace": {
            "estimate": tr.estimate,
            "stderr": tr.stderr,
            "num_matvecs": tr.num_matvecs,
            "method": "hutch++",
        },
        "spectral_density": density.to_dict(),
        "spectrum_ends": ends,
        "timing_s": {**timings, "analysis": analysis_time},
        "environment": environment(),
    }
    if reporter.rank == 0:
        write_json(out_dir / "results.json", results)
        torch.save(model.state_dict(), out_dir / "model.pt")
    reporter.say(
        f"Wrote {out_dir / 'results.json'}, {eig_figure}, {figure} and the trained weights "
        f"{out_dir / 'model.pt'}"
    )
    return results

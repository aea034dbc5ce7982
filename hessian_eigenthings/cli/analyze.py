"""``hessian-eigenthings analyze``: curvature of a local HuggingFace causal LM on a text file.

The text is tokenised once, truncated to ``--max-tokens`` tokens and cut into blocks of
``--block-size`` tokens (a shorter final block is kept as its own batch if it has at least
two tokens). The operator is the curvature of the mean next-token cross-entropy over all
predicted tokens: every batch is weighted by its number of predicted tokens
(``block_length - 1`` per sequence), so the short final block counts exactly as much as
its tokens.

Operators (``--operator``): ``hessian`` (exact Hessian-vector products), ``ggn``
(``J^T H_loss J`` with the closed-form softmax cross-entropy Hessian) and ``fisher`` (the
empirical Fisher ``(1/N) sum_i g_i g_i^T``). Analyses: the top ``--k`` eigenvalues
(restarted Lanczos, with residual norms), ``--trace`` (Hutch++ with its standard error) and
``--density`` (Stochastic Lanczos Quadrature). Results go to ``OUT/results.json``,
``OUT/eigenvalues.png`` and ``OUT/spectrum.png``.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import time
from pathlib import Path
from typing import Any

import torch

from hessian_eigenthings.cli.errors import BadInput
from hessian_eigenthings.cli.progress import Reporter
from hessian_eigenthings.cli.report import environment, write_json

__all__ = [
    "load_checkpoint",
    "make_batches",
    "read_text",
    "resolve_device",
    "run_analyze",
    "select_param_names",
]

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise a validated ``torch.device``.

    Raises:
        BadInput: Unparseable device, or a CUDA device that does not exist here.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise BadInput(
            f"--device {spec!r} is not a device; expected e.g. 'cpu' or 'cuda:0'"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"--device {spec!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadInput(
                f"--device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def read_text(path: str) -> str:
    """Read a UTF-8 text file, rejecting missing, unreadable and empty files."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"--text {path!r} does not exist")
    if not p.is_file():
        raise BadInput(f"--text {path!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BadInput(f"--text {path!r} is not UTF-8 text: {err}") from err
    if not text.strip():
        raise BadInput(f"--text {path!r} is empty; it must contain some text to tokenise")
    return text


def load_checkpoint(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    *,
    quiet: bool = False,
    progress: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local directory, in eval mode.

    ``quiet`` silences transformers' warnings; without ``progress`` its loading bars are
    switched off (the command's progress policy applies to them too).

    Raises:
        BadInput: The path is missing, is not a directory, has no model config / weights
            or no tokenizer files, or ``transformers`` is not installed.
    """
    p = Path(path)
    if not p.exists():
        raise BadInput(f"--model {path!r} does not exist")
    if not p.is_dir():
        raise BadInput(
            f"--model {path!r} is not a directory; expected a HuggingFace checkpoint directory "
            "(config.json, model.safetensors, tokenizer files) as written by save_pretrained"
        )
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / name).is_file() for name in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES[::2]))
    if missing:
        present = sorted(q.name for q in p.iterdir())[:10]
        raise BadInput(
            f"--model {path!r} does not contain a HuggingFace model: missing "
            f"{', '.join(missing)} (directory holds {present}). Save one with "
            "model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
        )
    try:
        import transformers
    except ImportError as err:
        raise BadInput(
            "analyze needs transformers: pip install 'hessian-eigenthings[transformers]'"
        ) from err
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    if quiet:
        transformers.utils.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as err:
        raise BadInput(
            f"--model {path!r} has no usable tokenizer files (tokenizer.json or the files "
            f"of a slow tokenizer): {err}"
        ) from err
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(
        str(p), dtype=dtype, local_files_only=True
    )
    model.to(device)
    model.eval()
    return model, tokenizer


def make_batches(
    ids: list[int], block_size: int, batch_size: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Cut a token sequence into ``{"input_ids", "labels"}`` batches of full blocks.

    Full blocks of ``block_size`` tokens are stacked ``batch_size`` at a time; a final
    partial block with at least two tokens forms its own batch. ``labels`` equal
    ``input_ids`` (the model shifts them for next-token prediction).
    """
    n_full = len(ids) // block_size
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(n_full)]
    batches = []
    for i in range(0, len(blocks), batch_size):
        t = torch.tensor(blocks[i : i + batch_size], dtype=torch.long, device=device)
        batches.append({"input_ids": t, "labels": t})
    rest = ids[n_full * block_size :]
    if len(rest) >= 2:
        t = torch.tensor([rest], dtype=torch.long, device=device)
        batches.append({"input_ids": t, "labels": t})
    return batches


def predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of next-token targets in a batch: ``rows * (length - 1)``."""
    rows, length = batch["labels"].shape
    return int(rows * (length - 1))


def select_param_names(model: Any, globs: list[str] | None) -> list[str]:
    """Names of trainable parameters matching any glob (all of them for ``None``).

    Raises:
        BadInput: A glob matches no parameter; the message lists close names.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not globs:
        return names
    for g in globs:
        if not any(fnmatch.fnmatchcase(n, g) for n in names):
            close = difflib.get_close_matches(g, names, n=5, cutoff=0.4)
            hint = f"close matches: {close}" if close else f"names look like {names[:5]}"
            raise BadInput(
                f"--params {g!r} matches no parameter of the model ({len(names)} trainable); "
                f"{hint}. Globs use shell syntax ('*' also matches dots)."
            )
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]


def shifted_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of positions ``0..T-2`` flattened to ``(B * (T - 1), V)``."""
    logits = model(input_ids=batch["input_ids"]).logits
    return logits[:, :-1].reshape(-1, logits.shape[-1])


def next_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Targets of :func:`shifted_logits`: ``labels[:, 1:]`` flattened."""
    return batch["labels"][:, 1:].reshape(-1)


def per_token_losses(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token next-token losses ``(B * (T - 1),)``: the Fisher's samples are tokens."""
    return torch.nn.functional.cross_entropy(
        shifted_logits(model, batch).float(), next_tokens(batch), reduction="none"
    )


def _build_operator(kind: str, model: Any, batches: list[Any], names: list[str]) -> Any:
    """The ``--operator`` for the token-mean next-token loss over ``batches``.

    Hessian: HuggingFace's own loss (``model(**batch).loss``; for a float64 model the
    same loss computed from the logits in float64, since HuggingFace upcasts to float32
    only). GGN: the logits and the shifted cross-entropy with its closed-form Hessian
    (fused kernel on CUDA, eager on the CPU, where ``torch.compile`` time would dominate
    a short run). Fisher: per-token losses, so the Fisher's samples are tokens.
    """
    from hessian_eigenthings.loss_fns.huggingface import (
        hf_lm_forward,
        hf_lm_loss,
        hf_lm_shifted_ce,
    )
    from hessian_eigenthings.operators.fisher import EmpiricalFisherOperator
    from hessian_eigenthings.operators.ggn import GGNOperator
    from hessian_eigenthings.operators.hessian import HessianOperator

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    if kind == "hessian":
        loss = hf_lm_loss(from_logits=dtype == torch.float64)
        return HessianOperator(model, batches, loss, param_filter=names)
    if kind == "ggn":
        fused = "auto" if device.type == "cuda" else "eager"
        return GGNOperator(
            model, batches, hf_lm_forward(), hf_lm_shifted_ce(fused=fused), param_filter=names
        )
    return EmpiricalFisherOperator(
        model, batches, per_token_losses, param_filter=names, weight_fn=predicted_tokens
    )


def run_analyze(args: argparse.Namespace, *, reporter: Reporter) -> dict[str, Any]:
    """Validate the inputs, run the requested analyses, print and write the results.

    Args:
        args: Parsed ``analyze`` arguments (see ``hessian-eigenthings analyze --help``).
        reporter: Where results and progress go.

    Returns:
        The results written to ``OUT/results.json``.
    """
    from hessian_eigenthings.algorithms.lanczos import lanczos
    from hessian_eigenthings.algorithms.spectral_density import spectral_density
    from hessian_eigenthings.algorithms.trace import trace
    from hessian_eigenthings.cli.figures import (
        require_matplotlib,
        save_eigenvalue_figure,
        save_spectrum_figure,
    )

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out {str(out_dir)!r} exists and is not a directory")
    if args.k == 0 and not args.trace and not args.density:
        raise BadInput("nothing to compute: --k 0 without --trace or --density")
    if args.k > 0 or args.density:
        require_matplotlib()
    device = resolve_device(args.device)
    dtype = _DTYPES[args.dtype]
    text = read_text(args.text)
    model, tokenizer = load_checkpoint(
        args.model, dtype, device, quiet=reporter.quiet, progress=reporter.progress
    )

    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if max_positions is not None and args.block_size > max_positions:
        raise BadInput(
            f"--block-size {args.block_size} exceeds the model's context of {max_positions} "
            "positions"
        )
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[: args.max_tokens]
    if len(ids) < 2:
        raise BadInput(
            f"--text {args.text!r} gives {len(ids)} token(s); next-token loss needs at least 2"
        )
    batches = make_batches(ids, args.block_size, args.batch_size, device)
    names = select_param_names(model, args.params)
    n_params = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    if args.k > n_params:
        raise BadInput(f"--k {args.k} exceeds the number of selected parameters ({n_params})")
    n_targets = sum(predicted_tokens(b) for b in batches)
    reporter.say(
        f"{type(model).__name__} from {args.model}: {len(names)} parameter tensors selected "
        f"({n_params:,} entries), {args.dtype} on {device}; {len(ids):,} tokens in "
        f"{len(batches)} batches ({n_targets:,} next-token targets)."
    )

    operator = _build_operator(args.operator, model, batches, names)
    label = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher"}[args.operator]
    results: dict[str, Any] = {
        "command": "analyze",
        "model": {"path": str(args.model), "class": type(model).__name__},
        "operator": args.operator,
        "params": {"globs": args.params, "names": names, "num_parameters": n_params},
        "data": {
            "text": str(args.text),
            "num_tokens": len(ids),
            "block_size": args.block_size,
            "batch_size": args.batch_size,
            "num_batches": len(batches),
            "num_targets": n_targets,
        },
        "dtype": args.dtype,
        "device": str(device),
        "seed": args.seed,
    }
    t0 = time.perf_counter()
    eig = None
    if args.k > 0:
        with reporter.task(operator, f"{label} eigenvalues") as op:
            eig = lanczos(op, args.k, which="LA", seed=args.seed)
        reporter.say(f"Top-{args.k} {label} eigenvalues (residual = ||A v - lambda v||):")
        for i in range(args.k):
            reporter.say(
                f"  {i + 1:>2}  {float(eig.eigenvalues[i]):>12.5g}   "
                f"residual {float(eig.residuals[i]):.2e}"
            )
        results["eigen"] = {
            "eigenvalues": eig.eigenvalues,
            "residuals": eig.residuals,
            "converged": eig.converged,
            "iterations": eig.iterations,
            "num_matvecs": eig.num_matvecs,
            "which": eig.which,
            "tol": eig.tol,
            "seed": eig.seed,
            "stop_reason": eig.stop_reason,
        }
        save_eigenvalue_figure(
            {label: (eig.eigenvalues, eig.residuals)},
            out_dir / "eigenvalues.png",
            title=f"Top {label} eigenvalues (error bars: residual norms)",
        )
    if args.trace:
        with reporter.task(operator, f"{label} trace", total=args.num_matvecs) as op:
            tr = trace(op, num_matvecs=args.num_matvecs, method="hutch++", seed=args.seed)
        reporter.say(
            f"{label} trace (Hutch++, {args.num_matvecs} matvecs): {float(tr.estimate):.5g} "
            f"+/- {float(tr.stderr):.2g} (one standard error)"
        )
        results["trace"] = {
            "estimate": tr.estimate,
            "stderr": tr.stderr,
            "num_matvecs": tr.num_matvecs,
            "method": "hutch++",
        }
    if args.density:
        runs, steps = args.density_runs, min(args.density_steps, n_params)
        with reporter.task(operator, f"{label} spectral density", total=runs * steps) as op:
            density = spectral_density(op, num_runs=runs, lanczos_steps=steps, seed=args.seed)
        results["spectral_density"] = density.to_dict()
        marks = {f"top-{args.k} (Lanczos)": eig.eigenvalues} if eig is not None else None
        save_spectrum_figure(
            density, out_dir / "spectrum.png", eigenvalues=marks, title=f"{label} spectrum"
        )
    results["timing_s"] = {"analysis": time.perf_counter() - t0}
    results["environment"] = environment()
    write_json(out_dir / "results.json", results)
    reporter.say(f"Wrote results to {out_dir}/")
    return results

"""``hessian-eigenthings analyze``: curvature of a local HuggingFace causal LM on a text file.

The text is tokenised once, truncated to ``--max-tokens`` tokens and cut into blocks of
``--block-size`` tokens (a shorter final block is kept as its own batch if it has at least
two tokens). The operator is the curvature of the mean next-token cross-entropy over all
predicted tokens: every batch is weighted by its number of predicted tokens
(``block_length - 1`` per sequence), so the short final block counts exactly as much as
its tokens.

Operators (``--operator``): ``hessian`` (exact Hessian-vector products), ``ggn``
(``J^T H_loss J`` with the closed-form softmax cross-entropy Hessian) and ``fisher`` (the
*empirical* Fisher ``(1/N) sum_i g_i g_i^T`` of the per-token gradients at the observed
labels, not the true Fisher). Analyses: ``--k`` eigenvalues at the ``--which`` end
(restarted Lanczos, with residual norms), ``--trace`` (Hutch++ with its standard error)
and ``--density`` (Stochastic Lanczos Quadrature). Both ends of the spectrum found and
the density's negative mass are always reported. Results go to ``OUT/results.json``,
``OUT/eigenvalues.png`` and ``OUT/spectrum.png``.

Under ``torchrun`` the blocks are split over the ranks (batch ``i`` to rank
``i mod world``) and the data-parallel operators sum over all of them: the result is the
single-process one. Only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from hessian_eigenthings.cli.errors import EXIT_OK, EXIT_TIME_LIMIT, BadInput
from hessian_eigenthings.cli.progress import Reporter, torchrun_rank
from hessian_eigenthings.cli.report import environment, write_json
from hessian_eigenthings.cli.stages import Stages, checkpoint_dir
from hessian_eigenthings.cli.summary import (
    OPERATOR_LABELS,
    both_ends,
    capitalized,
    eigen_lines,
    error_bar_hint,
    plural,
)

__all__ = [
    "check_checkpoint_dir",
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
# Files a tokenizer is loaded from: a fast tokenizer (tokenizer.json), the vocabularies of
# slow ones, or a tokenizer_config.json (byte-level tokenizers need nothing else). Without
# any of them transformers builds an empty tokenizer from config.json alone.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_R = TypeVar("_R")
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise a validated ``torch.device``.

    Under ``torchrun`` a CUDA device without an index is the rank's ``LOCAL_RANK``.

    Raises:
        BadInput: Unparseable device, or a CUDA device that does not exist here.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and torchrun_rank()[1] > 1:
        spec = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
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


def check_checkpoint_dir(path: str) -> Path:
    """Check that ``path`` holds a HuggingFace model (config, weights) and a tokenizer.

    Without tokenizer files transformers silently builds an empty tokenizer from
    ``config.json`` (every text becomes 0 tokens); this is refused here, before loading.

    Raises:
        BadInput: Missing path, not a directory, no config / weights, no tokenizer files.
    """
    p = Path(path)
    if not p.exists():
        raise BadInput(f"--model {path!r} does not exist")
    if not p.is_dir():
        raise BadInput(
            f"--model {path!r} is not a directory; expected a HuggingFace checkpoint directory "
            "(config.json, model.safetensors, tokenizer files) as written by save_pretrained"
        )
    present = sorted(q.name for q in p.iterdir())
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / name).is_file() for name in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES[::2]))
    if missing:
        raise BadInput(
            f"--model {path!r} does not contain a HuggingFace model: missing "
            f"{', '.join(missing)} (directory holds {present[:10]}). Save one with "
            "model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
        )
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise BadInput(
            f"--model {path!r} has a model but no tokenizer files: expected tokenizer.json "
            "(or a slow tokenizer's vocab.json + merges.txt, tokenizer.model, vocab.txt, or "
            f"tokenizer_config.json), got none (directory holds {present[:10]}); "
            "transformers would build an empty tokenizer that turns any text into 0 tokens. "
            "Fix: tokenizer.save_pretrained(dir) with the model's tokenizer, or copy its "
            "tokenizer files into the directory."
        )
    return p


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
        BadInput: The directory fails :func:`check_checkpoint_dir`, its tokenizer has an
            empty vocabulary, or ``transformers`` is not installed.
    """
    p = check_checkpoint_dir(path)
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
    if not getattr(tokenizer, "vocab_size", 1):
        raise BadInput(
            f"--model {path!r}: the tokenizer loaded from it has an empty vocabulary "
            f"({type(tokenizer).__name__}, vocab_size 0): expected tokenizer files with a "
            "vocabulary (tokenizer.json, or vocab.json + merges.txt, ...). Fix: "
            "tokenizer.save_pretrained(dir) with the model's tokenizer."
        )
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


def _build_operator(
    kind: str,
    model: Any,
    batches: list[Any],
    names: list[str],
    *,
    microbatch_size: int | None,
    distributed: bool,
) -> Any:
    """The ``--operator`` for the token-mean next-token loss over ``batches``.

    Hessian: HuggingFace's own loss (``model(**batch).loss``; for a float64 model the
    same loss computed from the logits in float64, since HuggingFace upcasts to float32
    only). GGN: the logits and the shifted cross-entropy with its closed-form Hessian
    (fused kernel on CUDA, eager on the CPU, where ``torch.compile`` time would dominate
    a short run). Empirical Fisher: per-token losses, so its samples are tokens.
    ``distributed``: the data-parallel versions (``batches`` is this rank's shard).
    """
    from hessian_eigenthings.loss_fns.huggingface import (
        hf_lm_forward,
        hf_lm_loss,
        hf_lm_loss_of_output,
    )
    from hessian_eigenthings.operators.fisher import EmpiricalFisherOperator
    from hessian_eigenthings.operators.ggn import GGNOperator
    from hessian_eigenthings.operators.hessian import HessianOperator

    Hessian: Any = HessianOperator
    GGN: Any = GGNOperator
    Fisher: Any = EmpiricalFisherOperator
    if distributed:
        from hessian_eigenthings.operators.distributed import ddp

        Hessian, GGN, Fisher = (
            ddp.DDPHessianOperator,
            ddp.DDPGGNOperator,
            ddp.DDPEmpiricalFisherOperator,
        )
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    common: dict[str, Any] = {"param_filter": names, "microbatch_size": microbatch_size}
    if kind == "hessian":
        loss = hf_lm_loss(from_logits=dtype == torch.float64)
        return Hessian(model, batches, loss, **common)
    if kind == "ggn":
        fused = "auto" if device.type == "cuda" else "eager"
        return GGN(model, batches, hf_lm_forward, hf_lm_loss_of_output(fused=fused), **common)
    return Fisher(model, batches, per_token_losses, weight_fn=predicted_tokens, **common)


def _data_fingerprint(ids: list[int], args: argparse.Namespace) -> str:
    """SHA-256 of the token ids and how they are cut: what checkpoint files must match."""
    h = hashlib.sha256()
    h.update(json.dumps([args.operator, args.block_size, args.batch_size]).encode())
    h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:32]


def _init_distributed(device: torch.device) -> bool:
    """Join the ``torchrun`` process group (gloo on CPU, NCCL on CUDA); ``False`` alone."""
    import torch.distributed as dist

    if torchrun_rank()[1] <= 1:
        return False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def run_analyze(args: argparse.Namespace, *, reporter: Reporter) -> int:
    """Validate the inputs, run the requested analyses, print and write the results.

    Args:
        args: Parsed ``analyze`` arguments (see ``hessian-eigenthings analyze --help``).
        reporter: Where results and progress go.

    Returns:
        The exit code: ``0``, or ``3`` when ``--time-limit`` stopped a stage (the partial
        results are written; rerun with the same ``--checkpoint`` to continue).
    """
    import torch.distributed as dist

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out {str(out_dir)!r} exists and is not a directory")
    if args.k == 0 and not args.trace and not args.density:
        raise BadInput("nothing to compute: --k 0 without --trace or --density")
    if args.k > 0 or args.density:
        from hessian_eigenthings.cli.figures import require_matplotlib

        require_matplotlib()
    device = resolve_device(args.device)
    ckpt_dir = checkpoint_dir(args.checkpoint)
    text = read_text(args.text)
    check_checkpoint_dir(args.model)  # bad input is reported before joining torchrun's group
    distributed = _init_distributed(device)
    try:
        return _analyze(args, text, reporter, out_dir, device, ckpt_dir, distributed)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _analyze(
    args: argparse.Namespace,
    text: str,
    reporter: Reporter,
    out_dir: Path,
    device: torch.device,
    ckpt_dir: Path | None,
    distributed: bool,
) -> int:
    from hessian_eigenthings.algorithms.checkpoint import operator_identity

    rank, world = torchrun_rank() if distributed else (0, 1)
    operator: Any = None
    stages = Stages(
        time_limit=args.time_limit,
        checkpoint=ckpt_dir,
        identity=lambda: operator_identity(operator),
        device=device,
        write=rank == 0,
    )
    dtype = _DTYPES[args.dtype]
    with stages.timed("load_model"):
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
    with stages.timed("tokenize"):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[: args.max_tokens]
    if len(ids) < 2:
        raise BadInput(
            f"--text {args.text!r} gives {plural(len(ids), 'token')} with the tokenizer of "
            f"--model {args.model!r}; next-token loss needs at least 2"
        )
    batches = make_batches(ids, args.block_size, args.batch_size, device)
    if len(batches) < world:
        raise BadInput(
            f"{plural(len(batches), 'batch')} cannot be split over {world} torchrun ranks; "
            "use more --max-tokens, a smaller --block-size or --batch-size, or fewer ranks"
        )
    names = select_param_names(model, args.params)
    n_params = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    if args.k > n_params:
        raise BadInput(f"--k {args.k} exceeds the number of selected parameters ({n_params})")
    n_targets = sum(predicted_tokens(b) for b in batches)
    label = OPERATOR_LABELS[args.operator]
    over = f", split over {world} ranks" if world > 1 else ""
    reporter.say(
        f"{type(model).__name__} from {args.model}: "
        f"{plural(len(names), 'parameter tensor')} selected ({plural(n_params, 'entry', 'entries')}"
        f"), {args.dtype} on {device}; {plural(len(ids), 'token')} in "
        f"{plural(len(batches), 'batch')} ({plural(n_targets, 'next-token target')}){over}."
    )
    what = {
        "fisher": " (the mean of g g^T over per-token gradients g at the observed next tokens; "
        "not the true Fisher, whose labels are drawn from the model)"
    }.get(args.operator, "")
    reporter.say(f"Operator: {label} of the mean next-token loss{what}.")

    with stages.timed("build_operator"):
        operator = _build_operator(
            args.operator,
            model,
            batches[rank::world],
            names,
            microbatch_size=args.microbatch_size,
            distributed=distributed,
        )
    operator.fingerprint = _data_fingerprint(ids, args)
    results: dict[str, Any] = {
        "command": "analyze",
        "model": {"path": str(args.model), "class": type(model).__name__},
        "operator": args.operator,
        "operator_label": label,
        "params": {"globs": args.params, "names": names, "num_parameters": n_params},
        "data": {
            "text": str(args.text),
            "num_tokens": len(ids),
            "block_size": args.block_size,
            "batch_size": args.batch_size,
            "microbatch_size": args.microbatch_size,
            "num_batches": len(batches),
            "num_targets": n_targets,
            "world_size": world,
        },
        "dtype": args.dtype,
        "device": str(device),
        "seed": args.seed,
    }

    analysis = _Analysis(args, stages, reporter, operator, label, results)
    eig = _eigen_stage(analysis) if args.k else None
    if args.trace:
        _trace_stage(analysis)
    density = None
    if args.density:
        density = _density_stage(analysis, min(args.density_steps, n_params))
    if eig is not None or density is not None:
        lines, ends = both_ends(
            label, eigen=eig, density=density, density_remedy="raise --density-runs"
        )
        for line in lines:
            reporter.say(line)
        results["spectrum_ends"] = ends
    if rank == 0:
        with stages.timed("figures"):
            _figures(args, label, eig, density, out_dir)
    return _finish(results, stages, out_dir, reporter, rank)


def _to_dict(result: Any) -> dict[str, Any]:
    return result.to_dict()


@dataclass(frozen=True)
class _Analysis:
    """What the analysis stages share: the options, the stages, the output and the operator.

    Attributes:
        args: The parsed command line.
        stages: Runs (or reuses) the stages.
        reporter: Prints and draws the progress bars.
        operator: The curvature operator.
        label: The operator's name in the output (e.g. ``"Hessian"``).
        results: What ``results.json`` will hold; each stage adds its entry.
    """

    args: argparse.Namespace
    stages: Stages
    reporter: Reporter
    operator: Any
    label: str
    results: dict[str, Any]

    def stage(
        self,
        name: str,
        task: str,
        algorithm: Callable[..., _R],
        config: dict[str, Any],
        from_dict: Callable[[dict[str, Any]], _R],
        *,
        to_dict: Callable[[_R], dict[str, Any]] = _to_dict,
        total: int | None = None,
    ) -> _R | None:
        """Run (or reuse) ``algorithm(operator, **config)`` as the stage ``name``.

        Args:
            name: Stage name (see :meth:`Stages.run`).
            task: What the progress bar counts, after the label.
            algorithm: The library call; it also takes ``checkpoint=`` and ``time_limit=``.
            config: Its keywords (all of them change its numbers: recorded with the result).
            from_dict: Restores a finished result.
            to_dict: Serialises one for reuse (default ``result.to_dict()``).
            total: Products the bar expects, if known.

        Returns:
            The result, or ``None`` when the time limit passed before the stage could start.
        """
        with self.reporter.task(self.operator, f"{self.label} {task}", total=total) as op:
            return self.stages.run(
                name,
                lambda **kw: algorithm(op, **config, **kw),
                config=config,
                to_dict=to_dict,
                from_dict=from_dict,
            )


def _eigen_stage(analysis: _Analysis) -> Any:
    """``--k`` eigenpairs at the ``--which`` end: run (or reuse), print, record."""
    from hessian_eigenthings.algorithms.lanczos import lanczos
    from hessian_eigenthings.algorithms.results import EigenResult

    args, reporter = analysis.args, analysis.reporter
    config = {
        "k": args.k,
        "which": args.which,
        "tol": args.tol,
        "max_iter": args.lanczos_matvecs,
        "seed": args.seed,
    }
    eig = analysis.stage(
        "eigen",
        "eigenvalues",
        lanczos,
        config,
        EigenResult.from_dict,
        to_dict=lambda r: r.to_dict(include_eigenvectors=False),
    )
    if eig is None:
        return None
    for line in eigen_lines(analysis.label, eig, remedy="raise --lanczos-matvecs or --tol"):
        reporter.say(line)
    for i in range(eig.k):
        hint = error_bar_hint(
            f"eigenvalue {i + 1}",
            float(eig.eigenvalues[i]),
            float(eig.residuals[i]),
            "raise --lanczos-matvecs or lower --tol",
        )
        if hint:
            reporter.say(hint)
    analysis.results["eigen"] = {
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
    return eig


def _trace_stage(analysis: _Analysis) -> None:
    """The Hutch++ trace with ``--trace-matvecs`` products: run (or reuse), print, record."""
    from hessian_eigenthings.algorithms.estimator_results import TraceResult
    from hessian_eigenthings.algorithms.trace import trace

    args, label = analysis.args, analysis.label
    config = {"num_matvecs": args.trace_matvecs, "method": "hutch++", "seed": args.seed}
    tr = analysis.stage(
        "trace", "trace", trace, config, TraceResult.from_dict, total=args.trace_matvecs
    )
    if tr is None:
        return
    partial = " (partial: --time-limit)" if tr.stop_reason == "time_limit" else ""
    analysis.reporter.say(
        f"{capitalized(label)} trace (Hutch++, {plural(tr.num_matvecs, 'matvec')}){partial}: "
        f"{float(tr.estimate):.5g} +/- {float(tr.stderr):.2g} (one standard error)"
    )
    hint = error_bar_hint(
        f"{label} trace",
        float(tr.estimate),
        float(tr.stderr),
        f"raise --trace-matvecs (now {args.trace_matvecs})",
    )
    if hint:
        analysis.reporter.say(hint)
    analysis.results["trace"] = {
        "estimate": tr.estimate,
        "stderr": tr.stderr,
        "num_matvecs": tr.num_matvecs,
        "method": "hutch++",
        "stop_reason": tr.stop_reason,
    }


def _density_stage(analysis: _Analysis, steps: int) -> Any:
    """The SLQ spectral density with ``steps`` Lanczos steps: run (or reuse), print, record."""
    from hessian_eigenthings.algorithms.estimator_results import SpectralDensityResult
    from hessian_eigenthings.algorithms.spectral_density import spectral_density

    runs = analysis.args.density_runs
    config = {"num_runs": runs, "lanczos_steps": steps, "seed": analysis.args.seed}
    density = analysis.stage(
        "density",
        "spectral density",
        spectral_density,
        config,
        SpectralDensityResult.from_dict,
        total=runs * steps,
    )
    if density is None:
        return None
    partial = (
        f" (partial: {plural(density.num_runs, 'run')} before --time-limit)"
        if density.stop_reason == "time_limit"
        else ""
    )
    analysis.reporter.say(
        f"{capitalized(analysis.label)} spectral density (SLQ, {plural(runs, 'run')} x "
        f"{plural(steps, 'step')}){partial}: written to results.json and spectrum.png"
    )
    analysis.results["spectral_density"] = density.to_dict()
    return density


def _figures(args: argparse.Namespace, label: str, eig: Any, density: Any, out_dir: Path) -> None:
    """``eigenvalues.png`` and ``spectrum.png`` of what was computed."""
    from hessian_eigenthings.cli.figures import save_eigenvalue_figure, save_spectrum_figure

    if eig is not None:
        save_eigenvalue_figure(
            {label: eig},
            out_dir / "eigenvalues.png",
            title=f"{capitalized(label)}: {args.k} eigenvalues ({eig.which}) and their residuals",
        )
    if density is not None:
        marks = {f"Lanczos ({eig.which})": eig.eigenvalues} if eig is not None else None
        save_spectrum_figure(
            density,
            out_dir / "spectrum.png",
            eigenvalues=marks,
            title=f"{capitalized(label)} spectral density",
        )


def _finish(
    results: dict[str, Any], stages: Stages, out_dir: Path, reporter: Reporter, rank: int
) -> int:
    """Record stages and timings, write ``results.json``, print where things went."""
    analysis = sum(stages.timings.get(s.name, 0.0) for s in stages.stages)
    results["stages"] = {s.name: {"status": s.status, "seconds": s.seconds} for s in stages.stages}
    results["timing_s"] = {**stages.timings, "analysis": analysis}
    results["complete"] = not stages.stopped
    results["environment"] = environment()
    reused = [s.name for s in stages.stages if s.status == "reused"]
    if reused:
        reporter.say(
            f"Reused finished stages from --checkpoint {stages.checkpoint}: {', '.join(reused)}."
        )
    timing = ", ".join(f"{name} {sec:.1f} s" for name, sec in stages.timings.items())
    reporter.say(f"Timings: {timing}.")
    if rank == 0:
        write_json(out_dir / "results.json", results)
    if stages.stopped:
        left = [s.name for s in stages.stages if s.status in ("time_limit", "not_started")]
        resume = (
            "rerun the same command to continue from the checkpoints"
            if stages.checkpoint is not None
            else "add --checkpoint DIR to continue where it stopped next time"
        )
        reporter.say(
            f"--time-limit {stages.time_limit:g} s reached: {', '.join(left)} incomplete; "
            f"partial results in {out_dir}/; {resume}."
        )
        return EXIT_TIME_LIMIT
    reporter.say(f"Wrote results to {out_dir}/")
    return EXIT_OK

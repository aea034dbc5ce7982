"""The ``hessian-eigenthings`` command line: argument parsing, dispatch and exit codes.

Subcommands:

- ``demo``: train a small classifier on scikit-learn's bundled digits and report the top
  Hessian and GGN eigenvalues, the Hessian trace and the spectral density.
- ``analyze``: the same analyses for a local HuggingFace causal-LM checkpoint on a text file.

Exit codes: ``0`` success, ``2`` bad input (see :mod:`hessian_eigenthings.cli.errors`),
``1`` the analysis failed, ``3`` ``--time-limit`` stopped it (partial results written).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hessian_eigenthings.cli.errors import EXIT_FAILURE, BadInput, CLIError
from hessian_eigenthings.cli.progress import Reporter, progress_enabled, torchrun_rank

__all__ = ["build_parser", "main"]

PROG = "hessian-eigenthings"

_N = TypeVar("_N", int, float)


def _number(
    text: str,
    kind: Callable[[str], _N],
    expected: str,
    ok: Callable[[_N], bool],
    *,
    out_of_range: Callable[[_N], str] | None = None,
) -> _N:
    """An option's number: ``kind(text)`` if ``ok`` accepts it.

    Args:
        text: The option's value as given.
        kind: ``int`` or ``float``.
        expected: What the option takes, for the messages (``"a positive integer"``).
        ok: Whether a parsed value is in range.
        out_of_range: The message for a value out of range; default ``"expected
            <expected>, got <value>"``.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a number of ``kind``, or out of range.
    """
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        message = (
            f"expected {expected}, got {value}" if out_of_range is None else out_of_range(value)
        )
        raise argparse.ArgumentTypeError(message)
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def _non_negative_int(text: str) -> int:
    return _number(text, int, "a non-negative integer", lambda v: v >= 0)


def _unit_interval(text: str) -> float:
    return _number(
        text,
        float,
        "a number in (0, 1)",
        lambda v: 0.0 < v < 1.0,
        out_of_range=lambda v: f"expected a number in (0, 1), got {v:g}",
    )


def _seconds(text: str) -> float:
    return _number(
        text,
        float,
        "seconds (> 0)",
        lambda v: v > 0.0 and v != float("inf"),
        out_of_range=lambda _: f"expected a finite number of seconds > 0, got {text}",
    )


class _RenamedOption(argparse.Action):
    """Store the value of an option given by its new or its old name.

    The old name emits a ``DeprecationWarning`` naming the new one (shown with
    ``python -W default``; the command's output stays unchanged for existing scripts).
    """

    def __init__(self, *args: Any, new_name: str, **kwargs: Any) -> None:
        self.new_name = new_name
        super().__init__(*args, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string != self.new_name:
            warnings.warn(
                f"{parser.prog}: {option_string} is deprecated, use {self.new_name}",
                DeprecationWarning,
                stacklevel=2,
            )
        setattr(namespace, self.dest, values)


_WHICH_HELP = (
    "which end of the spectrum: LM largest magnitude (both signs, as the library's "
    "lanczos), LA largest, SA smallest (default: %(default)s)"
)


def _common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output")
    group.add_argument(
        "--quiet", "-q", action="store_true", help="print nothing but errors; no progress bars"
    )
    group.add_argument(
        "--progress",
        action="store_true",
        help="draw progress bars on stderr even when it is not a terminal",
    )
    group.add_argument(
        "--traceback",
        action="store_true",
        help="print the full Python traceback when the analysis fails",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hessian-eigenthings`` (exposed for tests and docs)."""
    from hessian_eigenthings import __version__

    common = _common_flags()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Matrix-free curvature of neural networks: top Hessian / GGN / Fisher "
            "eigenvalues, trace and spectral density."
        ),
        epilog=(
            "Exit codes: 0 success, 1 the analysis failed, 2 bad input, 3 --time-limit "
            "stopped the analysis (partial results written; rerun with the same "
            "--checkpoint to continue)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="train a small digits classifier and analyse its curvature (no download)",
        description=(
            "Train a small MLP on scikit-learn's bundled digits for a few seconds, then print "
            "k Hessian and GGN eigenvalues (--which end) with residuals, the Hessian trace "
            "with its error bar, both ends of the Hessian spectrum and its negative mass, and "
            "write OUT/results.json, OUT/eigenvalues.png and OUT/spectrum.png. Needs the "
            "'demo' extra: pip install 'hessian-eigenthings[demo]'."
        ),
    )
    demo.add_argument(
        "--out",
        default="hessian-eigenthings-demo",
        metavar="DIR",
        help="output directory (default: %(default)s)",
    )
    demo.add_argument(
        "--k", type=_positive_int, default=5, help="number of eigenvalues (default: %(default)s)"
    )
    demo.add_argument("--which", choices=("LM", "LA", "SA"), default="LM", help=_WHICH_HELP)
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of training and estimators (default: 0)"
    )

    analyze = sub.add_parser(
        "analyze",
        parents=[common],
        help="analyse a local HuggingFace causal-LM checkpoint on a text file",
        description=(
            "Tokenise a text file into blocks and compute curvature of the mean next-token "
            "loss of a local HuggingFace causal-LM checkpoint (a directory with the model and "
            "tokenizer files). Both ends of the spectrum found and the density's negative "
            "mass are always reported. Under torchrun the blocks are split over the ranks. "
            "Needs the 'transformers' extra."
        ),
    )
    analyze.add_argument("--model", required=True, metavar="PATH", help="checkpoint directory")
    analyze.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    analyze.add_argument(
        "--operator",
        choices=("hessian", "ggn", "fisher"),
        default="hessian",
        help=(
            "curvature matrix: the Hessian, the generalized Gauss-Newton, or the empirical "
            "Fisher (mean outer product of per-token gradients at the observed labels) "
            "(default: %(default)s)"
        ),
    )
    analyze.add_argument(
        "--params",
        nargs="+",
        metavar="GLOB",
        default=None,
        help="parameter-name globs to restrict to, e.g. 'transformer.h.0.*' (default: all)",
    )
    analyze.add_argument(
        "--k",
        type=_non_negative_int,
        default=5,
        help="number of eigenvalues, 0 to skip (default: %(default)s)",
    )
    analyze.add_argument("--which", choices=("LM", "LA", "SA"), default="LM", help=_WHICH_HELP)
    analyze.add_argument(
        "--tol",
        type=_unit_interval,
        default=None,
        metavar="TOL",
        help=(
            "relative residual tolerance of the eigenvalues (default: the library's, by "
            "dtype: 3.5e-4 for float32, 1.5e-8 for float64)"
        ),
    )
    analyze.add_argument(
        "--lanczos-matvecs",
        type=_positive_int,
        default=None,
        metavar="M",
        help="matvec budget of the eigenvalues (default: the library's, 100 x basis size)",
    )
    analyze.add_argument("--trace", action="store_true", help="estimate the trace (Hutch++)")
    analyze.add_argument(
        "--density", action="store_true", help="estimate the spectral density (SLQ)"
    )
    analyze.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=2048,
        metavar="N",
        help="use at most N tokens of the text (default: %(default)s)",
    )
    analyze.add_argument(
        "--block-size",
        type=_positive_int,
        default=128,
        metavar="T",
        help="tokens per sequence (default: %(default)s)",
    )
    analyze.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        metavar="B",
        help="sequences per batch (default: %(default)s)",
    )
    analyze.add_argument(
        "--dtype",
        choices=("float32", "float64", "bfloat16", "float16"),
        default="float32",
        help="model dtype (default: %(default)s)",
    )
    analyze.add_argument(
        "--device", default="auto", help="'cpu', 'cuda', 'cuda:1', ... (default: auto)"
    )
    analyze.add_argument(
        "--trace-matvecs",
        "--num-matvecs",
        dest="trace_matvecs",
        type=_positive_int,
        default=60,
        metavar="M",
        action=_RenamedOption,
        new_name="--trace-matvecs",
        help="matvec budget of the trace estimate (default: %(default)s; --num-matvecs is "
        "its deprecated old name)",
    )
    analyze.add_argument(
        "--density-runs",
        type=_positive_int,
        default=8,
        metavar="R",
        help="random probes of the spectral density (default: %(default)s)",
    )
    analyze.add_argument(
        "--density-steps",
        type=_positive_int,
        default=40,
        metavar="M",
        help="Lanczos steps per probe of the spectral density (default: %(default)s)",
    )
    analyze.add_argument(
        "--microbatch-size",
        type=_positive_int,
        default=None,
        metavar="B",
        help="split each batch into pieces of at most B sequences to bound memory (the "
        "result is the same; default: no split)",
    )
    analyze.add_argument(
        "--checkpoint",
        default=None,
        metavar="DIR",
        help="folder of per-stage checkpoint files: a stopped or killed run continues from "
        "them and finished stages are reused when the same command runs again",
    )
    analyze.add_argument(
        "--time-limit",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="wall-clock budget of the whole command; when it passes, the partial results "
        "are written and the exit code is 3 (rerun with the same --checkpoint to continue)",
    )
    analyze.add_argument("--seed", type=int, default=0, help="seed of the estimators")
    analyze.add_argument(
        "--out",
        default="hessian-eigenthings-analysis",
        metavar="DIR",
        help="output directory (default: %(default)s)",
    )
    return parser


def _run(args: argparse.Namespace, reporter: Reporter) -> int:
    if args.command == "demo":
        from hessian_eigenthings.cli.demo import run_demo

        run_demo(out=args.out, k=args.k, seed=args.seed, which=args.which, reporter=reporter)
        return 0
    if args.command == "analyze":
        from hessian_eigenthings.cli.analyze import run_analyze

        return run_analyze(args, reporter=reporter)
    # argparse rejects unknown subcommands before we get here
    raise BadInput(f"unknown command {args.command!r}; expected 'demo' or 'analyze'")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (``0``, ``1``, ``2`` or ``3``).

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    rank, world = torchrun_rank()
    prefix = f"[rank {rank}] " if world > 1 else ""
    where = f"{prefix}{PROG} {args.command}"
    try:
        show = progress_enabled(quiet=args.quiet, force=args.progress)
        if show and importlib.util.find_spec("tqdm") is None:
            if args.progress:
                raise BadInput("--progress needs tqdm: pip install tqdm (or drop --progress)")
            show = False
        reporter = Reporter(quiet=args.quiet, progress=show, rank=rank)
        return _run(args, reporter)
    except CLIError as err:
        print(f"{where}: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    except Exception as err:
        if args.traceback:
            traceback.print_exc()
        print(
            f"{where}: failed: {type(err).__name__}: {err}"
            + ("" if args.traceback else "\n(run again with --traceback for details)"),
            file=sys.stderr,
            flush=True,
        )
        return EXIT_FAILURE

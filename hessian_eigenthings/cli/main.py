"""The ``hessian-eigenthings`` command line: argument parsing, dispatch and exit codes.

Subcommands:

- ``demo``: train a small classifier on scikit-learn's bundled digits and report the top
  Hessian and GGN eigenvalues, the Hessian trace and the spectral density.
- ``analyze``: the same analyses for a local HuggingFace causal-LM checkpoint on a text file.

Exit codes: ``0`` success, ``2`` bad input (see :mod:`hessian_eigenthings.cli.errors`),
``1`` the analysis failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
from collections.abc import Sequence

from hessian_eigenthings.cli.errors import EXIT_FAILURE, EXIT_OK, BadInput, CLIError
from hessian_eigenthings.cli.progress import Reporter, progress_enabled

__all__ = ["build_parser", "main"]

PROG = "hessian-eigenthings"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


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
        epilog="Exit codes: 0 success, 1 the analysis failed, 2 bad input.",
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
            "the top-k Hessian and GGN eigenvalues with residuals and the Hessian trace with "
            "its error bar, and write OUT/results.json and OUT/spectrum.png. Needs the 'demo' "
            "extra: pip install 'hessian-eigenthings[demo]'."
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
            "tokenizer files). Needs the 'transformers' extra."
        ),
    )
    analyze.add_argument("--model", required=True, metavar="PATH", help="checkpoint directory")
    analyze.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    analyze.add_argument(
        "--operator",
        choices=("hessian", "ggn", "fisher"),
        default="hessian",
        help="curvature matrix (default: %(default)s)",
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
        help="number of top eigenvalues, 0 to skip (default: %(default)s)",
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
        "--num-matvecs",
        type=_positive_int,
        default=60,
        metavar="M",
        help="matvec budget of the trace estimate (default: %(default)s)",
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
    analyze.add_argument("--seed", type=int, default=0, help="seed of the estimators")
    analyze.add_argument(
        "--out",
        default="hessian-eigenthings-analysis",
        metavar="DIR",
        help="output directory (default: %(default)s)",
    )
    return parser


def _run(args: argparse.Namespace, reporter: Reporter) -> None:
    if args.command == "demo":
        from hessian_eigenthings.cli.demo import run_demo

        run_demo(out=args.out, k=args.k, seed=args.seed, reporter=reporter)
    elif args.command == "analyze":
        from hessian_eigenthings.cli.analyze import run_analyze

        run_analyze(args, reporter=reporter)
    else:  # argparse rejects unknown subcommands before we get here
        raise BadInput(f"unknown command {args.command!r}; expected 'demo' or 'analyze'")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (``0``, ``1`` or ``2``).

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        show = progress_enabled(quiet=args.quiet, force=args.progress)
        if show and importlib.util.find_spec("tqdm") is None:
            if args.progress:
                raise BadInput("--progress needs tqdm: pip install tqdm (or drop --progress)")
            show = False
        reporter = Reporter(quiet=args.quiet, progress=show)
        _run(args, reporter)
    except CLIError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:
        if args.traceback:
            traceback.print_exc()
        print(
            f"{PROG} {args.command}: failed: {type(err).__name__}: {err}"
            + ("" if args.traceback else "\n(run again with --traceback for details)"),
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK

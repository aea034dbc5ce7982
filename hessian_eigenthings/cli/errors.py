"""Errors of the command line and the exit codes they map to.

The command line distinguishes two kinds of trouble, so that scripts can tell them apart:

- exit code ``2``: bad input (a missing path, a directory without a model, an empty text
  file, a parameter glob that matches nothing, an invalid option value). Fix the command.
- exit code ``1``: the analysis itself failed (an exception inside the library, non-finite
  values, running out of memory). The message names what failed.

``argparse`` also exits with ``2`` on malformed arguments, which is the same category.

Exit code ``3`` is not an error: ``--time-limit`` stopped the analysis, the partial
results are written, and rerunning the same command with the same ``--checkpoint``
continues it (a job script can loop on it).
"""

from __future__ import annotations

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_TIME_LIMIT",
    "AnalysisFailed",
    "BadInput",
    "CLIError",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_TIME_LIMIT = 3


class CLIError(Exception):
    """An error the command line reports as one message line and an exit code."""

    exit_code = EXIT_FAILURE


class BadInput(CLIError):
    """The user's input is wrong (exit code 2); the message says what was expected."""

    exit_code = EXIT_BAD_INPUT


class AnalysisFailed(CLIError):
    """The analysis could not be completed (exit code 1)."""

    exit_code = EXIT_FAILURE

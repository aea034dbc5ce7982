"""The ``hessian-eigenthings`` command line (``demo`` and ``analyze``).

Run ``hessian-eigenthings --help`` or ``python -m hessian_eigenthings --help``.
"""

from hessian_eigenthings.cli.main import build_parser, main

__all__ = ["build_parser", "main"]

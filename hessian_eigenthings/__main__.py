"""``python -m hessian_eigenthings``: the command line (same as ``hessian-eigenthings``)."""

import sys

from hessian_eigenthings.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Install the peer libraries that benchmarks/compare_peers.py measures against.
#
#   bash benchmarks/setup_peers.sh
#
# - curvlinops-for-pytorch and PyHessian go into the CURRENT environment, with torch held at
#   the installed version by a constraint file (pip may never upgrade or replace torch).
# - transformers (for the tiny GPT-2 problem) likewise, if it is not installed yet.
# - The ORIGINAL hessian-eigenthings 1.0.0a5 has the same import name as this library, so it
#   goes into its own virtual environment, benchmarks/.venv-original, created with
#   --system-site-packages (it reuses this environment's torch, numpy and scipy). The
#   benchmark runs it in a subprocess through benchmarks/peers/original_driver.py.
#
# None of this is needed by the library or its tests. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY="${PYTHON:-python}"

TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" >"$CONSTRAINTS"
echo "setup_peers: holding torch==${TORCH_VERSION}"

# curvlinops needs backpack-for-pytorch, whose requirements include torchvision. The PyPI
# torchvision wheel does not match a CPU-only torch build ("operator torchvision::nms does not
# exist") and, once installed, breaks `import transformers` model classes for the whole
# environment. Neither curvlinops nor backpack's core imports it, so the peers go in with
# --no-deps and their real requirements are listed here explicitly (torchvision left out).
"$PY" -m pip install -q --no-deps \
  "curvlinops-for-pytorch==3.0.1" "backpack-for-pytorch==1.7.1" "pyhessian==0.1"
DEPS=("einops>=0.3" "einconv>=0.1" "unfoldNd>=0.2" "linear_operator>=0.2" "opt-einsum>=3.4"
  "tqdm" "scipy>=1.10" "numpy")
if ! "$PY" -c 'import transformers' 2>/dev/null; then
  DEPS+=("transformers>=4.40")
fi
"$PY" -m pip install -q -c "$CONSTRAINTS" "${DEPS[@]}"

VENV=benchmarks/.venv-original
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
# --no-deps: its requirements (torch, numpy, scipy, tqdm) come from the parent environment;
# the constraint keeps the parent's torch in any case.
"$VENV/bin/python" -m pip install -q --no-deps -c "$CONSTRAINTS" "hessian-eigenthings==1.0.0a5"
# Run from /tmp: with the repository root as the working directory, '' on sys.path would
# find this repository's hessian_eigenthings first.
(cd /tmp && "$OLDPWD/$VENV/bin/python" - <<'PYEOF'
import hessian_eigenthings, torch
assert hessian_eigenthings.__version__ == "1.0.0a5", hessian_eigenthings.__file__
print("setup_peers: original", hessian_eigenthings.__version__, "at", hessian_eigenthings.__file__,
      "with torch", torch.__version__)
PYEOF
)
"$PY" -c 'import importlib.metadata as m; print("setup_peers: curvlinops",
m.version("curvlinops-for-pytorch"), "pyhessian", m.version("pyhessian"), "torch",
m.version("torch"))'

"""The original manual (hessian-eigenthings 1.0.0a5) against this package.

1. Every ``from hessian_eigenthings... import ...`` statement in the manual runs.
2. The manual's code examples run as written: each fragment is read from the manual file
   by its line range (its first line is checked, so a different manual fails loudly) and
   executed in a namespace holding what the fragment assumes is already there (a model,
   a dataloader, a loss; fragments on one page share a namespace, in order).

The manual lives beside the repository, in ``../shared/seed/`` (CI keeps a copy of
``shared/`` next to the clone). Fragments that need ``torchrun`` (DDP) are covered by
tests/test_distributed.py instead.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
MANUAL = ROOT.parent / "shared" / "seed" / "hessian-eigenthings-manual.txt"

pytestmark = pytest.mark.skipif(
    not MANUAL.is_file(),
    reason=f"the original manual is not beside the repository ({MANUAL} is absent)",
)

IMPORT = re.compile(
    r"^from (hessian_eigenthings(?:\.\w+)*) import (\((?:[^()]*)\)|[^\n]+)$", re.MULTILINE
)


def _manual_text() -> str:
    return MANUAL.read_text(encoding="utf-8")


def import_statements(text: str) -> list[str]:
    """Every ``from hessian_eigenthings... import ...`` statement, comments stripped."""
    out = []
    for m in IMPORT.finditer(text):
        names = re.sub(r"#[^\n]*", "", m.group(2)).strip()
        out.append(f"from {m.group(1)} import {names}")
    return sorted(set(out))


def test_import_statements_are_found() -> None:
    stmts = import_statements(_manual_text())
    assert len(stmts) >= 15, stmts
    assert any(
        "DDPHessianOperator" in s and s.startswith("from hessian_eigenthings.operators ")
        for s in stmts
    )
    assert any("(" in s and "LambdaOperator" in s for s in stmts)  # multi-line form parsed


@pytest.mark.parametrize("statement", import_statements(_manual_text()) if MANUAL.is_file() else [])
def test_manual_import_statement_resolves(statement: str) -> None:
    namespace: dict[str, Any] = {}
    exec(statement, namespace)
    imported = [n.strip() for n in statement.split(" import ", 1)[1].strip("() ").split(",")]
    for name in filter(None, imported):
        assert namespace.get(name) is not None, f"{statement}: {name} is missing"


# ---------------------------------------------------------------- the manual's examples
class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.mlp(torch.tanh(self.attn(x))))


class _TinyNet(nn.Module):
    """Parameter names of the manual's filters: ``blocks.*.attn.*``, ``blocks.*.mlp.*``,
    ``transformer.h.*.attn.*`` and a ``head`` of >= 1000 entries (its custom filter)."""

    def __init__(self, d: int = 32, classes: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(d), _Block(d)])
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList([_Block(d)])
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in [*self.blocks, *self.transformer.h]:
            x = block(x)
        return self.head(x)


def _classifier_setup() -> dict[str, Any]:
    from hessian_eigenthings import (
        cross_entropy_loss_of_output,
        match_names,
        supervised_forward,
    )

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = _TinyNet()
    dataloader = [
        (torch.randn(n, 32, generator=gen), torch.randint(0, 32, (n,), generator=gen))
        for n in (8, 5)
    ]

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    return {
        "torch": torch,
        "nn": nn,
        "model": model,
        "dataloader": dataloader,
        "loss_fn": loss_fn,
        "match_names": match_names,
        "model_forward": supervised_forward,
        "loss_of_output_fn": cross_entropy_loss_of_output(),
    }


def _gpt2_setup() -> dict[str, Any]:
    transformers = pytest.importorskip("transformers")
    from hessian_eigenthings import HessianOperator, hf_lm_loss, match_names

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=13,
        n_positions=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(1, 13, (2, 6), generator=torch.Generator().manual_seed(2))
    return {
        "torch": torch,
        "model": model,
        "dataloader": [{"input_ids": ids, "labels": ids}],
        "match_names": match_names,
        "HessianOperator": HessianOperator,
        "hf_lm_loss": hf_lm_loss,
    }


def _ggn_loss_setup() -> dict[str, Any]:
    """The "Estimating Trace" fragment passes ``loss_fn`` as the GGN's loss of output."""
    from hessian_eigenthings import cross_entropy_loss_of_output

    return {**_classifier_setup(), "loss_fn": cross_entropy_loss_of_output()}


SETUPS = {"classifier": _classifier_setup, "gpt2": _gpt2_setup, "ggn_loss": _ggn_loss_setup}

# (first line, last line, the first line's text, setup); fragments of one page share a
# namespace in this order.
PAGES: dict[str, list[tuple[int, int, str, str]]] = {
    "introduction": [
        (152, 164, "from hessian_eigenthings import HessianOperator, lanczos", "classifier"),
        (172, 179, "from hessian_eigenthings import GGNOperator", "classifier"),
        (195, 197, "from hessian_eigenthings.loss_fns.standard import", "classifier"),
        (211, 213, "from hessian_eigenthings.loss_fns.huggingface import hf_lm_loss", "classifier"),
        (229, 247, "import torch", "classifier"),
    ],
    "introduction_filter_and_trace": [
        (253, 263, "from hessian_eigenthings import HessianOperator, lanczos", "classifier"),
        (267, 271, "from hessian_eigenthings import HessianOperator, trace", "classifier"),
    ],
    "architecture_usage_patterns": [
        (1375, 1386, "from hessian_eigenthings import HessianOperator, lanczos", "classifier"),
        (1390, 1399, "from hessian_eigenthings import HessianOperator, lanczos", "classifier"),
        (1403, 1411, "from hessian_eigenthings import HessianOperator, trace", "classifier"),
    ],
    "operators_param_filter": [
        (1547, 1555, "from hessian_eigenthings import HessianOperator, match_names", "classifier"),
    ],
    "operators_lambda": [
        (1642, 1648, "from hessian_eigenthings import LambdaOperator", "classifier"),
    ],
    "operators_top_eigenvalues": [
        (1660, 1669, "from hessian_eigenthings import HessianOperator, lanczos", "classifier"),
    ],
    "operators_trace": [
        (1673, 1683, "from hessian_eigenthings import GGNOperator, trace", "ggn_loss"),
    ],
    "operators_components": [
        (1687, 1703, "from hessian_eigenthings import HessianOperator, match_regex", "classifier"),
    ],
    "algorithms_example_usage": [
        (
            2085,
            2100,
            "from hessian_eigenthings import HessianOperator, lanczos, trace, spectral",
            "classifier",
        ),
    ],
    "loss_functions_classification": [
        (2377, 2384, "from hessian_eigenthings.operators import HessianOperator", "classifier"),
    ],
    "loss_functions_huggingface": [
        (2388, 2399, "from hessian_eigenthings.operators import GGNOperator", "gpt2"),
    ],
    "param_utils_filters": [
        (2515, 2535, "from hessian_eigenthings.operators import HessianOperator", "classifier"),
        (2542, 2546, "# Match multiple parameter groups", "classifier"),
    ],
    "param_utils_huggingface": [
        (2552, 2558, "# Attention parameters in GPT-2", "gpt2"),
    ],
    "param_utils_practical": [
        (2605, 2622, "from hessian_eigenthings.algorithms import lanczos", "classifier"),
        (2626, 2652, "# Full model Hessian", "classifier"),
        (2662, 2677, "def custom_filter(name: str, param: nn.Parameter) -> bool:", "classifier"),
        (2683, 2692, "# Intersection of patterns", "classifier"),
    ],
}


def _fragment(start: int, end: int, first: str) -> str:
    lines = _manual_text().splitlines()[start - 1 : end]
    assert lines and lines[0].startswith(first), (
        f"manual line {start} is {lines[0] if lines else '<EOF>'!r}, expected {first!r}: the "
        "manual changed; update the line ranges"
    )
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_manual_example_runs_as_written(page: str, capsys: pytest.CaptureFixture[str]) -> None:
    fragments = PAGES[page]
    namespace = SETUPS[fragments[0][3]]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for start, end, first, _ in fragments:
            code = compile(_fragment(start, end, first), f"manual:{start}", "exec")
            exec(code, namespace)
    deprecations = [  # ours only (torch emits its own, e.g. for torch.jit.script)
        str(w.message)
        for w in caught
        if w.category is DeprecationWarning and "1.0.0a5" in str(w.message)
    ]
    if page == "operators_lambda":
        # LambdaOperator(size=..., matvec=...): the 1.0.0a5 keyword, renamed matvec_fn
        assert any("matvec_fn" in m for m in deprecations), deprecations
        op = namespace["custom_op"]
        assert torch.equal(op.matvec(torch.ones(1000)), torch.full((1000,), 2.0))
    else:
        assert not deprecations, deprecations
    for name in ("eig_result", "result", "eig_attn", "trace_result", "density_result"):
        value = namespace.get(name)
        if hasattr(value, "eigenvalues"):
            assert torch.isfinite(value.eigenvalues).all()
        if hasattr(value, "estimate"):
            assert value.estimate == value.estimate  # not NaN
    if page == "algorithms_example_usage":
        assert abs(namespace["density_result"].integral() - 1.0) < 1e-2

"""Vector backends: column blocks (as ``matmat``), probes, agreement, deprecated row methods.

Oracles: plain torch arithmetic on the same tensors (the distributed backends are checked
against it in ``tests/test_distributed.py``).
"""

from __future__ import annotations

import pytest
import torch

from hessian_eigenthings import SingleDeviceBackend

CPU = torch.device("cpu")


def _draw(backend: SingleDeviceBackend, n: int, num: int, dist: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return backend.probes(n, num, generator=gen, dtype=torch.float64, device=CPU, distribution=dist)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_probes_are_the_columns_of_one_draw(distribution: str) -> None:
    be = SingleDeviceBackend()
    block = _draw(be, 7, 4, distribution)
    assert block.shape == (7, 4)
    gen = torch.Generator().manual_seed(3)
    if distribution == "gaussian":
        rows = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    else:
        rows = torch.randint(0, 2, (4, 7), generator=gen).double() * 2 - 1
    assert torch.equal(block, rows.T)
    one = be.random(7, generator=torch.Generator().manual_seed(3), dtype=torch.float64, device=CPU)
    want = torch.randn(7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(one, want)


def test_gram_of_columns() -> None:
    be = SingleDeviceBackend()
    X, Y = _draw(be, 9, 3, "gaussian"), _draw(be, 9, 2, "rademacher")
    assert torch.equal(be.gram(X, Y), X.T @ Y)
    assert torch.equal(be.gram(X, Y[:, 0]), X.T @ Y[:, 0])


def test_row_methods_are_deprecated_aliases() -> None:
    be = SingleDeviceBackend()
    X = _draw(be, 9, 3, "gaussian")
    with pytest.warns(DeprecationWarning, match=r"gram\(X.T, Y.T\)"):
        assert torch.equal(be.block_gram(X.T, X.T), X.T @ X)
    with pytest.warns(DeprecationWarning, match=r"gram\(X.T, y\)"):
        assert torch.equal(be.block_dot(X.T, X[:, 0]), X.T @ X[:, 0])
    gen = torch.Generator().manual_seed(3)
    with pytest.warns(DeprecationWarning, match="probes"):
        rows = be.random(9, num=3, generator=gen, dtype=torch.float64, device=CPU)
    assert torch.equal(rows, X.T)


def test_a_backend_without_a_group_agrees_with_itself() -> None:
    be = SingleDeviceBackend()
    assert be.agree(True) is True and be.agree(False) is False
    assert be.is_first_process()
    be.barrier()  # nothing to wait for

"""Fused cross-entropy HVP backends against a float64 reference and autograd.

The eager reference is itself checked against an independent oracle (autograd Hessian-
vector products of ``torch.nn.functional.cross_entropy``); every backend is then checked
against the reference evaluated in float64 on the same (rounded) inputs. The Triton
kernel runs through Triton's interpreter on CPU: Triton reads ``TRITON_INTERPRET`` when it
is first imported, so the tests that need it (every test whose id contains ``triton``)
run in a child pytest process started with ``TRITON_INTERPRET=1`` by
``test_triton_cases_under_the_interpreter`` (or directly, when the whole session was
started with that variable).

Measured low-precision errors (relative 2-norm against the float64 reference on the same
rounded inputs; 5 seeds x shapes (4, 1000), (3, 5, 7), (2, 50257); OMP_NUM_THREADS=1):

=========  ==================  ==================================
dtype      eager               Triton (interpreter)
=========  ==================  ==================================
bfloat16   1.1e-3 .. 2.1e-3    2.2e-3 .. 4.1e-3 (see below)
float16    1.3e-4 .. 2.8e-4    1.3e-4 .. 2.8e-4
float32    6.9e-8 .. 1.2e-6    7.1e-8 .. 2.4e-7
=========  ==================  ==================================

Accumulation is float32 and the output is rounded once to the input dtype. Triton's
interpreter converts float32 to bfloat16 by truncation; compiled Triton (GPU) rounds to
nearest even like PyTorch, so on a GPU the bfloat16 error should match eager's (not
measured: no GPU was available). The bounds below are 1e-2 (bfloat16), 2e-3 (float16) and
1e-5 (float32).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hessian_eigenthings.loss_fns.fused_ce import (
    ce_hvp_compiled,
    ce_hvp_eager,
    ce_hvp_triton,
    fused_ce_hvp,
    linear_ce_ggn_product,
    resolve_backend,
)
from hessian_eigenthings.loss_fns.fused_ce import compiled as compiled_mod
from hessian_eigenthings.loss_fns.fused_ce import dispatch as dispatch_mod
from tests.helpers import rel_err

IGN = -100


def _problem(lead, vocab, *, dtype=torch.float32, seed=0, ignored=(), scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(*lead, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    u = torch.randn(*lead, vocab, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randint(0, vocab, lead, generator=gen)
    flat = t.view(-1)
    for i in ignored:
        flat[i] = IGN
    return z, t, u


def _reference(z, t, u, **kw):
    """Float64 eager reference on the same (already rounded) inputs."""
    return ce_hvp_eager(z.double(), t, u.double(), **kw)


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def interpret():
    """Tests of the Triton kernel: run only in a process started with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    if not INTERPRETING:
        pytest.skip(
            "runs in the TRITON_INTERPRET=1 child (test_triton_cases_under_the_interpreter)"
        )


@pytest.mark.skipif(INTERPRETING, reason="this process is the interpreter run")
def test_triton_cases_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "triton",
            str(Path(__file__).resolve()),
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and int(summary.split(" passed")[0].split()[-1]) >= 14, tail


def _triton(z, t, u, **kw):
    return ce_hvp_triton(z, t, u, **kw)


def _compile(z, t, u, **kw):
    return ce_hvp_compiled(z, t, u, **kw)


# ---------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("lead", [(5,), (2, 3), (1,)])
@pytest.mark.parametrize("vocab", [1, 7, 33])
def test_eager_reference_equals_autograd_hessian(lead, vocab):
    z, t, u = _problem(lead, vocab, dtype=torch.float64, ignored=(0,) if lead != (1,) else ())

    def loss(x):
        return F.cross_entropy(x.reshape(-1, vocab), t.reshape(-1), ignore_index=IGN)

    if (t != IGN).sum() == 0:
        pytest.skip("no valid row")
    _, want = torch.autograd.functional.hvp(loss, z, u)
    got = ce_hvp_eager(z, t, u)
    assert rel_err(got, want) < 1e-12 or (want.norm() == 0 and got.norm() == 0)


def test_eager_respects_n_valid_for_chunks():
    z, t, u = _problem((6,), 9, dtype=torch.float64, ignored=(1,))
    whole = ce_hvp_eager(z, t, u)
    parts = torch.cat(
        [
            ce_hvp_eager(z[s], t[s], u[s], n_valid=(t != IGN).sum())
            for s in (slice(0, 2), slice(2, 6))
        ]
    )
    assert rel_err(parts, whole) < 1e-14


# ---------------------------------------------------------------- every backend
BIG_CASES = [
    ((3, 5), 7, 4),  # (B, T) leading dims, vocabulary above a block of 4
    ((6,), 1000, 256),
    ((3,), 50257, 4096),
    ((2,), 131072, 4096),
]


@pytest.mark.parametrize(("lead", "vocab", "block"), BIG_CASES)
def test_triton_interpreter_fp32_matches_reference(interpret, lead, vocab, block):
    z, t, u = _problem(lead, vocab, ignored=(1,))
    got = _triton(z, t, u, block_size=block)
    want = _reference(z, t, u)
    assert got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5
    assert torch.all(got.reshape(-1, vocab)[1] == 0)  # ignored row


@pytest.mark.parametrize(
    ("lead", "vocab"), [((3, 5), 7), ((6,), 1000), ((3,), 50257), ((2,), 131072)]
)
def test_compile_fp32_matches_reference(lead, vocab):
    z, t, u = _problem(lead, vocab, ignored=(1,))
    got = _compile(z, t, u)
    assert got.dtype == torch.float32
    assert rel_err(got, _reference(z, t, u)) <= 1e-5
    assert torch.all(got.reshape(-1, vocab)[1] == 0)


@pytest.mark.parametrize(
    ("lead", "vocab"), [((3, 5), 7), ((6,), 1000), ((3,), 50257), ((2,), 131072)]
)
def test_eager_fp32_matches_reference(lead, vocab):
    z, t, u = _problem(lead, vocab, ignored=(1,))
    assert rel_err(ce_hvp_eager(z, t, u), _reference(z, t, u)) <= 1e-5


@pytest.mark.parametrize(
    ("dtype", "bound"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float64, 1e-13)]
)
def test_triton_interpreter_dtypes(interpret, dtype, bound):
    z, t, u = _problem((4,), 1000, dtype=dtype, ignored=(2,))
    got = _triton(z, t, u, block_size=128)
    assert got.dtype == dtype
    assert rel_err(got, _reference(z, t, u)) <= bound
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, 1e-2)])
def test_compile_dtypes(dtype, bound):
    z, t, u = _problem((4,), 1000, dtype=dtype, ignored=(2,))
    got = _compile(z, t, u)
    assert got.dtype == dtype
    assert rel_err(got, _reference(z, t, u)) <= bound


def test_mixed_dtypes_promote(interpret):
    z, t, _ = _problem((3,), 50, dtype=torch.bfloat16)
    u32 = torch.randn(3, 50)
    for fn in (ce_hvp_eager, _triton):
        got = fn(z, t, u32)
        assert got.dtype == torch.float32
        assert rel_err(got, _reference(z, t, u32)) <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "compile", "triton"])
def test_all_ignored_rows_give_zeros_not_nan(request, backend):
    if backend == "triton":
        request.getfixturevalue("interpret")
    z, t, u = _problem((2, 3), 1000, ignored=range(6))
    got = fused_ce_hvp(z, t, u, backend=backend)
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("backend", ["eager", "compile", "triton"])
def test_extreme_logits_stay_finite(request, backend):
    if backend == "triton":
        request.getfixturevalue("interpret")
    z, t, u = _problem((3,), 300, scale=1.0)
    z[0, 5] = 1e4  # one dominant logit: p is one-hot, H u ~ 0 on that row
    z[1] -= 1e4  # uniform shift: same H u as unshifted
    got = fused_ce_hvp(z, t, u, backend=backend)
    assert torch.isfinite(got).all()
    assert rel_err(got, _reference(z, t, u)) <= 1e-5


@pytest.mark.parametrize("backend", ["compile", "triton"])
def test_non_contiguous_inputs(request, backend):
    if backend == "triton":
        request.getfixturevalue("interpret")
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(7, 5, 2 * 33, generator=gen)[..., ::2].transpose(0, 1)  # vocab stride 2
    u = torch.randn(5, 7, 33, generator=gen)
    t = torch.randint(0, 33, (7, 5), generator=gen).T
    t[0, 3] = IGN
    if backend == "compile":  # rank 2 only: every rank is a separate (slow) compilation
        z, u, t = z[0], u[0], t[0]
    assert not z.is_contiguous() and not t.is_contiguous()
    got = fused_ce_hvp(z, t, u, backend=backend)
    assert rel_err(got, _reference(z, t, u)) <= 1e-5
    assert torch.all(got.reshape(-1, 7, 33)[0, 3] == 0)
    row_strided = torch.randn(4, 50, generator=gen)[:, :41]  # row stride 50 > vocab
    tt = torch.randint(0, 41, (4,), generator=gen)
    uu = torch.randn(41, 4, generator=gen).T  # column-major direction
    got = fused_ce_hvp(row_strided, tt, uu, backend=backend)
    assert rel_err(got, _reference(row_strided, tt, uu)) <= 1e-5


def test_triton_n_valid_tensor_and_four_dims(interpret):
    z, t, u = _problem((2, 2, 3), 20, ignored=(0, 5))
    n = torch.tensor(17)
    got = _triton(z, t, u, n_valid=n, block_size=8)
    assert rel_err(got, _reference(z, t, u, n_valid=17)) <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "compile", "triton"])
def test_inputs_do_not_change(request, backend):
    if backend == "triton":
        request.getfixturevalue("interpret")
    z, t, u = _problem((3,), 40)
    copies = [x.clone() for x in (z, t, u)]
    fused_ce_hvp(z, t, u, backend=backend)
    for x, c in zip((z, t, u), copies):
        assert torch.equal(x, c)


# ---------------------------------------------------------------- dispatch
def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, t, u = _problem((2,), 5)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_ce_hvp(z, t, u, backend="triton")
    with pytest.raises(RuntimeError, match="CUDA"):
        ce_hvp_triton(z, t, u)


def test_interpreter_set_after_import_is_explained(monkeypatch):
    pytest.importorskip("triton")
    if INTERPRETING:
        pytest.skip("the interpreter was set before import in this process")
    import triton  # noqa: F401  (imported without the interpreter)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    z, t, u = _problem((2,), 5)
    with pytest.raises(RuntimeError, match="before the process imports triton"):
        fused_ce_hvp(z, t, u, backend="triton")


def test_explicit_compile_that_cannot_run_raises_and_auto_falls_back(monkeypatch, caplog):
    monkeypatch.setitem(compiled_mod._ERRORS, "cpu", RuntimeError("no C++ compiler"))
    monkeypatch.setattr(dispatch_mod, "_LOGGED", set())
    z, t, u = _problem((2,), 5)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        fused_ce_hvp(z, t, u, backend="compile")
    with caplog.at_level(logging.INFO, logger="hessian_eigenthings"):
        assert resolve_backend("auto", torch.device("cpu")) == "eager"
    assert "uses backend 'eager'" in caplog.text and "no C++ compiler" in caplog.text
    got = fused_ce_hvp(z, t, u, backend="auto")
    assert rel_err(got, _reference(z, t, u)) <= 1e-6


def test_auto_picks_compile_on_cpu_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(dispatch_mod, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="hessian_eigenthings"):
        assert resolve_backend("auto", torch.device("cpu")) == "compile"
        assert resolve_backend("auto", torch.device("cpu")) == "compile"
    assert caplog.text.count("uses backend 'compile'") == 1


def test_unknown_backend_and_bad_inputs_raise():
    z, t, u = _problem((2,), 5)
    with pytest.raises(ValueError, match="Unknown fused CE-HVP backend"):
        fused_ce_hvp(z, t, u, backend="cuda")
    with pytest.raises(ValueError, match="shape"):
        ce_hvp_eager(z, t, u[:, :4])
    with pytest.raises(ValueError, match="target must have shape"):
        ce_hvp_eager(z, t[:1], u)
    with pytest.raises(TypeError, match="integer"):
        ce_hvp_eager(z, t.float(), u)


# ---------------------------------------------------------------- chunked linear head
def _head_oracle(h, w, b, t, dh, dw, db):
    """J^T H J of mean CE(h W^T + b) by torch.func (jvp, autograd hvp of F.cross_entropy, vjp)."""

    def logits(h, w, b):
        out = h @ w.T
        return out if b is None else out + b

    primals = (h, w) if b is None else (h, w, b)
    tangents = (dh, dw) if b is None else (dh, dw, db)
    fn = (lambda h, w: logits(h, w, None)) if b is None else logits
    z, zdot = torch.func.jvp(fn, primals, tangents)
    _, r = torch.autograd.functional.hvp(
        lambda x: F.cross_entropy(x.reshape(-1, x.shape[-1]), t.reshape(-1), ignore_index=IGN),
        z,
        zdot,
    )
    _, vjp = torch.func.vjp(fn, *primals)
    return vjp(r)


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_ggn_product_equals_materialised_oracle(chunk, with_bias):
    gen = torch.Generator().manual_seed(chunk)
    d, v = 5, 17

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    h, w, dh, dw = r(3, 4, d), r(v, d), r(3, 4, d), r(v, d)
    b, db = (r(v), r(v)) if with_bias else (None, None)
    t = torch.randint(0, v, (3, 4), generator=gen)
    t[0, 1] = t[2, 3] = IGN
    out = linear_ce_ggn_product(
        h,
        w,
        t,
        bias=b,
        d_hidden=dh,
        d_weight=dw,
        d_bias=db,
        want_hidden=True,
        chunk_size=chunk,
        backend="eager",
    )
    want = _head_oracle(h, w, b, t, dh, dw, db)
    assert rel_err(out.hidden, want[0]) < 1e-12
    assert rel_err(out.weight, want[1]) < 1e-12
    if with_bias:
        assert rel_err(out.bias, want[2]) < 1e-12
    else:
        assert out.bias is None


def test_linear_ggn_product_triton_and_fp32(interpret):
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 6, generator=gen), torch.randn(300, 6, generator=gen)
    dw = torch.randn(300, 6, generator=gen)
    t = torch.randint(0, 300, (9,), generator=gen)
    t[4] = IGN
    ref = linear_ce_ggn_product(h.double(), w.double(), t, d_weight=dw.double(), backend="eager")
    for backend in ("eager", "triton"):
        got = linear_ce_ggn_product(h, w, t, d_weight=dw, chunk_size=4, backend=backend)
        assert got.weight.dtype == torch.float32 and got.hidden is None
        assert rel_err(got.weight, ref.weight) <= 1e-5


def test_linear_ggn_product_rejects_bad_shapes():
    h, w, t = torch.randn(4, 3), torch.randn(7, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_ce_ggn_product(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="weight must be"):
        linear_ce_ggn_product(h, w.T, t)
    with pytest.raises(ValueError, match="d_weight"):
        linear_ce_ggn_product(h, w, t, d_weight=torch.randn(3, 3))

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
import re
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


# ---------------------------------------------------------------- awkward shapes, default launch
def _finite_reference(z, t, u, **kw):
    want = _reference(z, t, u, **kw)
    assert torch.isfinite(want).all()  # eager (float64) is finite on every case below
    return want


@pytest.mark.parametrize(
    ("lead", "vocab"), [((3, 5), 7), ((6,), 1000), ((5,), 50257), ((2,), 131072)]
)
def test_triton_default_config_matches_reference(interpret, lead, vocab):
    """The shape-specialised launch (no block_size): rows start at every phase mod 16 bytes."""
    z, t, u = _problem(lead, vocab, ignored=(1,))
    got = _triton(z, t, u)
    assert rel_err(got, _finite_reference(z, t, u)) <= 1e-5
    assert torch.all(got.reshape(-1, vocab)[1] == 0)


@pytest.mark.parametrize(
    ("vocab", "neg_inf", "block"),
    [
        (50257, 4096, None),
        (5000, 4096, 4096),
        (50257, 8200, 4096),
        (300, 100, 16),
        (1000, 600, None),
    ],
)
def test_triton_leading_neg_inf_blocks_stay_finite(interpret, vocab, neg_inf, block):
    """Rows whose first block(s) are all -inf (masked vocabulary): same as eager, not NaN."""
    z, t, u = _problem((3,), vocab)
    z[0, :neg_inf] = float("-inf")
    z[2, : min(2 * neg_inf, vocab - 1)] = float("-inf")
    t[0] = neg_inf + 1  # the target itself is finite; the loss is finite
    t[2] = vocab - 1
    got = _triton(z, t, u, **({} if block is None else {"block_size": block}))
    assert torch.isfinite(got).all()
    assert rel_err(got, _finite_reference(z, t, u)) <= 1e-5
    assert torch.all(got[0, :neg_inf] == 0)  # p = 0 where the logit is -inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_non_contiguous_rows_in_aligned_and_plain_frames(interpret, monkeypatch, dtype):
    """Rows of a wider buffer at an odd offset; direction in the same or another layout.

    The logits' frame is aligned; the direction shares it in the first case, not in the
    second; the (contiguous) output never does, as its row stride differs mod 16 bytes.
    """
    from hessian_eigenthings.loss_fns.fused_ce import triton_kernel

    frames = []
    launch = triton_kernel._launch

    def spy(device, grid, args, meta):
        frames.append((meta["ALIGN"], meta["U_FRAME"], meta["O_FRAME"]))
        return launch(device, grid, args, meta)

    monkeypatch.setattr(triton_kernel, "_launch", spy)
    gen = torch.Generator().manual_seed(5)
    vocab = 50257
    big = torch.randn(4, vocab + 11, generator=gen, dtype=torch.float64).to(dtype)
    z = big[:, 3 : 3 + vocab]  # row stride V + 11, storage offset 3: phases differ per row
    u_same = torch.randn(4, vocab + 11, generator=gen, dtype=torch.float64).to(dtype)[:, 3:-8]
    u_other = torch.randn(vocab, 4, generator=gen, dtype=torch.float64).to(dtype).T
    t = torch.randint(0, vocab, (4,), generator=gen)
    t[2] = IGN
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    for u in (u_same, u_other):
        assert not z.is_contiguous() and not u.is_contiguous()
        got = _triton(z, t, u)
        assert rel_err(got, _finite_reference(z, t, u)) <= bound
        assert torch.all(got[2] == 0)
    align = 16 // z.element_size()
    assert frames == [(align, True, False), (align, False, False)]


def test_triton_rows_all_ignored_default_config(interpret):
    z, t, u = _problem((3, 2), 50257, ignored=range(6))
    z[0, 0, :5000] = float("-inf")
    got = _triton(z, t, u)
    assert torch.equal(got, torch.zeros_like(got))


class _CountingInterpreter:
    """Count the elements Triton's interpreter loads and stores, by element bit width."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        self.loads: dict[int, int] = {}
        self.stores: dict[int, int] = {}
        load, store = builder.create_masked_load, builder.create_masked_store

        def counted_load(b, ptrs, mask, *args, **kw):
            bits = ptrs.get_element_ty().primitive_bitwidth
            self.loads[bits] = self.loads.get(bits, 0) + int(mask.data.sum())
            return load(b, ptrs, mask, *args, **kw)

        def counted_store(b, ptrs, value, mask, *args, **kw):
            bits = ptrs.get_element_ty().primitive_bitwidth
            self.stores[bits] = self.stores.get(bits, 0) + int(mask.data.sum())
            return store(b, ptrs, value, mask, *args, **kw)

        monkeypatch.setattr(builder, "create_masked_load", counted_load)
        monkeypatch.setattr(builder, "create_masked_store", counted_store)


@pytest.mark.parametrize("block", [None, 64])
def test_triton_memory_traffic_counted(interpret, monkeypatch, block):
    """Valid rows read z and u twice (4V) and write V; ignored rows read nothing, write V."""
    vocab, rows, ignored = 1000, 6, (1, 4)
    z, t, u = _problem((rows,), vocab, dtype=torch.bfloat16, ignored=ignored)
    counter = _CountingInterpreter(monkeypatch)
    got = _triton(z, t, u, **({} if block is None else {"block_size": block}))
    valid = rows - len(ignored)
    # 16-bit elements: z and u (bfloat16); 64-bit: one target per row, n once per valid row
    assert counter.loads == {16: 4 * vocab * valid, 64: rows + valid}
    assert counter.stores == {16: vocab * rows}
    assert rel_err(got, _finite_reference(z, t, u)) <= 1e-2


# ---------------------------------------------------------------- device guard (CPU analogue)
def test_launch_makes_the_logits_device_current(monkeypatch):
    """Triton launches on the current CUDA device: the launcher must switch to the logits'.

    CPU analogue of logits on ``cuda:1`` while ``cuda:0`` is current: ``torch.cuda.device``
    and the kernel are replaced by recorders (the real case is in test_fused_ce_cuda.py).
    """
    from hessian_eigenthings.loss_fns.fused_ce import triton_kernel

    current = [0]
    seen = []

    class FakeDeviceGuard:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append((current[0], grid, meta["BLOCK"]))

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceGuard)
    monkeypatch.setattr(triton_kernel, "_kernel", FakeKernel)
    triton_kernel._launch(torch.device("cuda", 1), (5,), [], {"BLOCK": 8})
    triton_kernel._launch(torch.device("cpu"), (2,), [], {"BLOCK": 4})
    assert seen == [(1, (5,), 8), (0, (2,), 4)]
    assert current == [0]  # the caller's device is restored


def test_triton_launch_receives_the_logits_device(interpret, monkeypatch):
    from hessian_eigenthings.loss_fns.fused_ce import triton_kernel

    devices = []
    launch = triton_kernel._launch
    monkeypatch.setattr(
        triton_kernel,
        "_launch",
        lambda device, *rest: devices.append(device) or launch(device, *rest),
    )
    z, t, u = _problem((3,), 40)
    _triton(z, t, u)
    assert devices == [z.device]


# ---------------------------------------------------------------- compiled for a GPU, offline
def _compile_for_sm90(z, t, u, monkeypatch, **kw):
    """Compile the kernel as a launch on an H100 would (same specialisation), without a GPU.

    Returns the PTX, the register count (from the cubin) and the launch meta-parameters.
    Uses Triton internals (the runtime's argument binder); skips if they moved.
    """
    import shutil

    from hessian_eigenthings.loss_fns.fused_ce import triton_kernel

    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as err:
        pytest.skip(f"Triton's compiler internals moved: {err}")
    captured = {}
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated
    monkeypatch.setattr(triton_kernel, "triton_unavailable_reason", lambda device: None)
    monkeypatch.setattr(
        triton_kernel, "_launch", lambda d, g, args, meta: captured.update(args=args, meta=meta)
    )
    triton_kernel.ce_hvp_triton(z, t, u, **kw)
    kernel = triton_kernel._kernel()
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = {**captured["meta"], "debug": False}
    try:
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, opts = binder(*captured["args"], **kwargs)
        opts, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
        compiled = triton.compile(
            ASTSource(kernel, sig, constexprs, attrs), target=target, options=opts.__dict__
        )
    except (AttributeError, TypeError) as err:
        pytest.skip(f"Triton's compiler internals moved: {err}")
    except RuntimeError as err:  # no ptxas for this target
        pytest.skip(f"cannot compile for sm_90 here: {err}")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cuobjdump = shutil.which("cuobjdump", path=str(tools))
    regs = None
    if cuobjdump is not None:
        cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"ce_hvp_{os.getpid()}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run(
            [cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True
        )
        cubin.unlink()
        found = [int(x) for x in re.findall(r"REG:(\d+)", dump.stdout)]
        regs = found[0] if found else None
    return compiled.asm["ptx"], regs, captured["meta"]


@pytest.mark.skipif(INTERPRETING, reason="compiles for a GPU; the interpreter has no compiler")
@pytest.mark.parametrize(
    ("dtype", "vector"), [(torch.bfloat16, "v4.b32"), (torch.float32, "v4.b32")]
)
def test_kernel_compiles_to_128bit_accesses_for_gpt2_vocab(monkeypatch, dtype, vector):
    """V = 50257 (not a multiple of 16): interior blocks still use 16-byte loads and stores.

    Before the aligned frame, ptxas reported element-wise (2-byte for bfloat16) accesses
    only and 146 (bfloat16) / 159 (float32) registers at BLOCK = 4096 with 4 warps.
    """
    pytest.importorskip("triton")
    vocab = 50257
    z, t, u = _problem((4,), vocab, dtype=dtype)
    ptx, regs, meta = _compile_for_sm90(z, t, u, monkeypatch)
    assert (meta["ALIGN"], meta["U_FRAME"], meta["O_FRAME"]) == (16 // z.element_size(), True, True)
    assert f"ld.global.{vector}" in ptx and f"st.global.{vector}" in ptx
    if regs is not None:
        assert regs <= 96, regs  # 56 (bfloat16) and 39 (float32) with triton 3.9


@pytest.mark.skipif(INTERPRETING, reason="compiles for a GPU; the interpreter has no compiler")
def test_kernel_compiles_padded_vocab_logits_to_128bit_loads(monkeypatch):
    """Logits sliced from a head padded to 50304 columns: the output (contiguous, stride
    50257) cannot share their frame, but logits and direction still load 16 bytes at a time."""
    pytest.importorskip("triton")
    vocab, padded = 50257, 50304
    z = torch.randn(4, padded).to(torch.bfloat16)[:, :vocab]
    u = torch.randn(4, padded).to(torch.bfloat16)[:, :vocab]
    t = torch.randint(0, vocab, (4,))
    ptx, _, meta = _compile_for_sm90(z, t, u, monkeypatch)
    assert (meta["ALIGN"], meta["U_FRAME"], meta["O_FRAME"]) == (8, True, False)
    assert "ld.global.v4.b32" in ptx


# ---------------------------------------------------------------- launch table, normaliser
@pytest.mark.parametrize(
    ("vocab", "size", "want"),
    [
        (50257, 2, (4096, 8)),  # bfloat16: 16 elements (two 16-byte vectors) per thread
        (50257, 4, (2048, 8)),  # float32: 8 per thread
        (262144, 8, (1024, 8)),  # float64: 4 per thread
        (1000, 4, (1024, 4)),  # one block of the next power of two, fewer warps
        (7, 2, (16, 1)),  # at least 16, so every dtype's 16-byte frame fits
        (1, 4, (16, 1)),
    ],
)
def test_kernel_config_table(vocab, size, want):
    from hessian_eigenthings.loss_fns.fused_ce.triton_kernel import kernel_config

    got = kernel_config(vocab, size)
    assert tuple(got) == want
    assert got.block // (32 * got.num_warps) <= 32 // size  # elements per thread per input


def test_default_block_constant_is_deprecated():
    from hessian_eigenthings.loss_fns.fused_ce import triton_kernel

    with pytest.warns(DeprecationWarning, match="kernel_config"):
        assert triton_kernel.DEFAULT_BLOCK == 4096


def test_normaliser_rejects_bad_counts():
    z, t, u = _problem((2,), 5)
    with pytest.raises(TypeError, match="n_valid must be an int"):
        ce_hvp_eager(z, t, u, n_valid=True)
    with pytest.raises(ValueError, match="1-element tensor"):
        ce_hvp_eager(z, t, u, n_valid=torch.tensor([1, 2]))
    want = ce_hvp_eager(z, t, u, n_valid=torch.tensor(7))
    assert torch.equal(ce_hvp_eager(z, t, u, n_valid=7), want)
    assert torch.equal(ce_hvp_eager(z, t, u, n_valid=7.0), want)


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

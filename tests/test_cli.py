"""The ``hessian-eigenthings`` command line, end to end.

- ``demo`` runs as a subprocess; its JSON eigenvalues and trace are checked against the
  dense float64 Hessian of the saved model (an independent oracle), and its PNG is decoded.
- ``analyze`` runs on a tiny GPT-2 checkpoint built and saved by the test (a WordLevel
  tokenizer trained on the fly; no download); its eigenvalues and trace are checked
  against the dense float64 Hessian of the next-token loss over the same token blocks,
  computed here independently of the CLI.
- Bad input exits with code 2 and a message naming the problem; failures exit with 1.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hessian_eigenthings.cli.errors import EXIT_BAD_INPUT, EXIT_FAILURE
from hessian_eigenthings.cli.main import build_parser, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the package re-exports the function ``main``; fetch the module itself
cli_main_module = importlib.import_module("hessian_eigenthings.cli.main")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, "-m", "hessian_eigenthings", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    import matplotlib.image as mpimg

    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.01, "image is blank"


def flat_hessian(loss_of_flat: Any, flat: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Dense Hessian of ``loss_of_flat`` at ``flat`` by vmapped forward-over-reverse HVPs."""
    grad = torch.func.grad(loss_of_flat)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(grad, (flat,), (v,))[1]

    eye = torch.eye(flat.numel(), dtype=flat.dtype)
    cols = [torch.func.vmap(hvp)(eye[i : i + chunk]) for i in range(0, flat.numel(), chunk)]
    H = torch.cat(cols).detach()
    return (H + H.T) / 2


# -- parsing and exit codes -------------------------------------------------------------


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "analyze" in out and "Exit codes" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["demo", "--k", "0"],
        ["demo", "--k", "three"],
        ["analyze", "--text", "x.txt"],
        ["analyze", "--model", "m", "--text", "t", "--operator", "laplacian"],
    ],
)
def test_malformed_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_BAD_INPUT
    assert "error" in capsys.readouterr().err


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["analyze", "--model", "m", "--text", "t"])
    assert (args.operator, args.k, args.trace, args.density) == ("hessian", 5, False, False)
    assert args.params is None and args.dtype == "float32" and args.device == "auto"
    args = build_parser().parse_args(
        ["analyze", "--model", "m", "--text", "t", "--params", "a*", "b"]
    )
    assert args.params == ["a*", "b"]


def test_failure_exits_1_and_bad_input_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from hessian_eigenthings.cli.errors import BadInput

    def boom(args: Any, reporter: Any) -> None:
        raise RuntimeError("matvec produced NaN in layer 3")

    monkeypatch.setattr(cli_main_module, "_run", boom)
    assert main(["demo", "--out", str(tmp_path)]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "failed: RuntimeError: matvec produced NaN in layer 3" in err
    assert "--traceback" in err

    def bad(args: Any, reporter: Any) -> None:
        raise BadInput("--text 'x' is empty")

    monkeypatch.setattr(cli_main_module, "_run", bad)
    assert main(["demo", "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "error: --text 'x' is empty" in capsys.readouterr().err


def test_progress_policy() -> None:
    from hessian_eigenthings.cli.progress import progress_enabled

    class Tty:
        def isatty(self) -> bool:
            return True

    class Pipe:
        def isatty(self) -> bool:
            return False

    assert progress_enabled(quiet=False, force=False, stream=Tty())
    assert not progress_enabled(quiet=False, force=False, stream=Pipe())
    assert progress_enabled(quiet=False, force=True, stream=Pipe())
    assert not progress_enabled(quiet=True, force=True, stream=Tty())


def test_progress_wrapper_counts_and_preserves_products() -> None:
    from hessian_eigenthings import LambdaOperator
    from hessian_eigenthings.cli.progress import _Counted

    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float32))
    op = LambdaOperator(lambda v: A @ v, 5, dtype=torch.float32, device="cpu", psd=True)
    ticks: list[int] = []
    wrapped = _Counted(op, ticks.append)
    v = torch.randn(5, dtype=torch.float64)  # higher precision passes through unchanged
    assert torch.equal(wrapped @ v, op @ v) and (wrapped @ v).dtype == torch.float64
    V = torch.randn(5, 3)
    assert torch.equal(wrapped.matmat(V), op.matmat(V))
    assert ticks == [1, 1, 3] and wrapped.psd and wrapped.size == 5


def test_console_script_is_installed() -> None:
    import shutil

    exe = shutil.which("hessian-eigenthings")
    if exe is None:
        pytest.skip("package not installed with its console script (pip install -e .)")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "hessian-eigenthings" in proc.stdout


# -- demo ---------------------------------------------------------------------------------


def test_demo_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    proc = run_cli("demo", "--out", str(out), "--k", "3", "--seed", "1", "--progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "matvec" in proc.stderr  # --progress draws bars on stderr even without a TTY
    results = json.loads((out / "results.json").read_text())
    assert_png(out / "spectrum.png")

    hess, ggn, tr = results["hessian"], results["ggn"], results["trace"]
    for res in (hess, ggn):
        assert len(res["eigenvalues"]) == len(res["residuals"]) == 3
        assert all(res["converged"])
        assert res["eigenvalues"] == sorted(res["eigenvalues"], reverse=True)
    assert min(ggn["eigenvalues"]) > 0  # the GGN is PSD and its top eigenvalues are positive
    assert tr["stderr"] > 0 and tr["num_matvecs"] > 0
    for lam in hess["eigenvalues"]:
        assert f"{lam:.5g}" in proc.stdout

    # Oracle: dense float64 Hessian of the mean training loss of the saved model.
    from hessian_eigenthings.cli.demo import load_digits_data, train_classifier

    data = load_digits_data(seed=1)
    model = train_classifier(data, seed=1, steps=0).double()
    model.load_state_dict(torch.load(out / "model.pt"))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x, y = data.x_train.double(), data.y_train

    def loss_of_flat(theta: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(theta, [s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes)}
        logits = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(logits, y)

    H = flat_hessian(loss_of_flat, flat)
    spectrum = torch.linalg.eigvalsh(H)
    exact = spectrum[spectrum.abs().argsort(descending=True)]  # default --which LM
    assert hess["which"] == ggn["which"] == "LM"
    got = torch.tensor(hess["eigenvalues"], dtype=torch.float64)
    bound = torch.tensor(hess["residuals"], dtype=torch.float64)
    # Residual bound of a symmetric eigenproblem, plus float32 rounding of the products.
    float32_rounding = 1e-5 * float(exact.abs().max())
    assert ((got - exact[:3]).abs() <= bound + float32_rounding).all(), (got, exact[:3], bound)
    exact_trace = float(torch.trace(H))
    assert abs(tr["estimate"] - exact_trace) <= 5 * tr["stderr"] + 1e-4 * abs(exact_trace)

    # both ends found lie inside the spectrum; the figures exist
    assert_png(out / "eigenvalues.png")
    ends = results["spectrum_ends"]
    assert float(spectrum[0]) - float32_rounding <= ends["smallest_found"]
    assert ends["largest_found"] <= float(spectrum[-1]) + float32_rounding
    assert ends["negative_mass"] is not None and "negative mass of the density" in proc.stdout
    assert {"train", "hessian_eigen", "ggn_eigen", "trace", "density", "figures"} <= set(
        results["timing_s"]
    )


# -- analyze --------------------------------------------------------------------------------

TEXT = (
    "the quick brown fox jumps over the lazy dog . "
    "curvature of the loss is measured by its hessian . "
    "a small model reads a small text and the fox sleeps . "
) * 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=fast.vocab_size,
        n_positions=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # non-trivial LayerNorm parameters make a richer Hessian
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "tiny-gpt2"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    (path.parent / "text.txt").write_text(TEXT, encoding="utf-8")
    return path


def reference_hessian(
    checkpoint: Path, glob_prefix: str, max_tokens: int, block: int
) -> torch.Tensor:
    """Dense float64 Hessian of the token-weighted next-token loss, built without the CLI."""
    import fnmatch

    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(checkpoint)
    # eager attention: the fused SDPA kernels have no forward-mode AD (the library's
    # curvature_mode handles that itself; this oracle must not depend on it)
    model = GPT2LMHeadModel.from_pretrained(
        checkpoint, dtype=torch.float64, attn_implementation="eager"
    ).eval()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:max_tokens]
    seqs = [ids[i : i + block] for i in range(0, len(ids), block)]
    seqs = [s for s in seqs if len(s) >= 2]
    total = sum(len(s) - 1 for s in seqs)
    named = [(n, p) for n, p in model.named_parameters() if fnmatch.fnmatchcase(n, glob_prefix)]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of_flat(theta: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(theta, [s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes)}
        out = torch.zeros((), dtype=torch.float64)
        for s in seqs:
            t = torch.tensor([s])
            logits = torch.func.functional_call(model, params, (t,)).logits
            ce = torch.nn.functional.cross_entropy(logits[0, :-1], t[0, 1:], reduction="sum")
            out = out + ce / total
        return out

    return flat_hessian(loss_of_flat, flat)


def test_analyze_end_to_end(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli(
        "analyze",
        "--model", str(checkpoint),
        "--text", str(checkpoint.parent / "text.txt"),
        "--params", "transformer.h.1.ln_*",
        "--k", "3", "--trace", "--density",
        "--max-tokens", "150", "--block-size", "32", "--batch-size", "2",
        "--num-matvecs", "48", "--density-runs", "4", "--density-steps", "16",
        "--device", "cpu",
        "--out", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "matvec" not in proc.stderr  # no progress bars when stderr is not a terminal
    results = json.loads((out / "results.json").read_text())
    assert_png(out / "spectrum.png")
    assert_png(out / "eigenvalues.png")
    assert results["params"]["num_parameters"] == 64
    assert results["data"]["num_tokens"] == 150
    assert results["data"]["num_targets"] == 4 * 31 + 21  # 4 full blocks + a block of 22

    H = reference_hessian(checkpoint, "transformer.h.1.ln_*", max_tokens=150, block=32)
    spectrum = torch.linalg.eigvalsh(H)
    # default --which LM, as the library's lanczos: largest magnitude, either sign
    exact = spectrum[spectrum.abs().argsort(descending=True)]
    assert results["eigen"]["which"] == "LM"
    got = torch.tensor(results["eigen"]["eigenvalues"], dtype=torch.float64)
    bound = torch.tensor(results["eigen"]["residuals"], dtype=torch.float64)
    float32_rounding = 1e-5 * float(exact.abs().max())
    assert ((got - exact[:3]).abs() <= bound + float32_rounding).all(), (got, exact[:3], bound)
    assert all(results["eigen"]["converged"])
    tr = results["trace"]
    exact_trace = float(torch.trace(H))
    assert abs(tr["estimate"] - exact_trace) <= 5 * tr["stderr"] + 1e-4 * abs(exact_trace)

    # Both ends found: Ritz values lie inside [lambda_min, lambda_max] (up to rounding),
    # and this fixture's negative end dominates, so the note is printed.
    ends = results["spectrum_ends"]
    lo, hi = float(spectrum[0]), float(spectrum[-1])
    assert lo - float32_rounding <= ends["smallest_found"] < 0 < ends["largest_found"]
    assert ends["largest_found"] <= hi + float32_rounding
    assert -lo > hi and ends["negative_end_dominates"]
    assert "note: the negative end dominates" in proc.stdout
    assert f"smallest {ends['smallest_found']:.5g}" in proc.stdout
    true_negative = float((spectrum < 0).double().mean())
    assert 0.0 <= ends["negative_mass"] <= 1.0 and true_negative > 0
    assert "negative mass of the density" in proc.stdout
    # per-stage timings and statuses
    assert {"load_model", "tokenize", "eigen", "trace", "density", "figures"} <= set(
        results["timing_s"]
    )
    assert results["complete"] and all(
        results["stages"][s]["status"] == "computed" for s in ("eigen", "trace", "density")
    )
    assert "in 3 batches (" in proc.stdout


def test_analyze_quiet_prints_nothing(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "analyze", "--model", str(checkpoint), "--text", str(checkpoint.parent / "text.txt"),
            "--params", "transformer.ln_f.*", "--k", "1", "--max-tokens", "40",
            "--block-size", "20", "--device", "cpu", "--quiet", "--out", str(tmp_path / "q"),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == "" and captured.err == ""
    assert (tmp_path / "q" / "results.json").is_file()


def _analyze_in_process(checkpoint: Path, tmp_path: Path, **overrides: str) -> list[str]:
    opts = {
        "--model": str(checkpoint),
        "--text": str(checkpoint.parent / "text.txt"),
        "--out": str(tmp_path / "o"),
        "--device": "cpu",
        "--block-size": "32",
        **overrides,
    }
    argv = ["analyze", "--k", "1"]
    for key, value in opts.items():
        argv += [key, *value.split("|")]
    return argv


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"--model": "{tmp}/does-not-exist"}, "does not exist"),
        ({"--model": "{tmp}/empty-dir"}, "does not contain a HuggingFace model"),
        ({"--text": "{tmp}/empty.txt"}, "is empty"),
        ({"--text": "{tmp}/missing.txt"}, "does not exist"),
        ({"--params": "transformer.h.7.ln_1.*"}, "close matches"),
        ({"--params": "transformer.h.*|blocks.0.*"}, "'blocks.0.*' matches no parameter"),
        ({"--block-size": "500"}, "exceeds the model's context"),
    ],
)
def test_analyze_bad_input_exits_2(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, str],
    message: str,
) -> None:
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    overrides = {k: v.replace("{tmp}", str(tmp_path)) for k, v in overrides.items()}
    code = main(_analyze_in_process(checkpoint, tmp_path, **overrides))
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert message in err
    if message == "close matches":
        assert "transformer.h.1.ln_1" in err


@pytest.mark.parametrize("operator", ["ggn", "fisher"])
def test_analyze_psd_operators(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], operator: str
) -> None:
    out = tmp_path / operator
    code = main(
        [
            "analyze", "--model", str(checkpoint), "--text", str(checkpoint.parent / "text.txt"),
            "--operator", operator, "--params", "transformer.ln_f.*", "--k", "2", "--trace",
            "--max-tokens", "64", "--block-size", "16", "--num-matvecs", "30",
            "--device", "cpu", "--out", str(out),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["operator"] == operator
    eig = results["eigen"]
    assert all(eig["converged"]) and min(eig["eigenvalues"]) > 0  # PSD, nonzero top pairs
    assert results["trace"]["estimate"] >= sum(eig["eigenvalues"]) - 5 * results["trace"]["stderr"]
    label = "GGN" if operator == "ggn" else "empirical Fisher"
    assert f"Top-2 {label} eigenvalues (largest magnitude" in captured.out
    assert f"Operator: {label} of the mean next-token loss" in captured.out
    assert results["operator_label"] == label


def test_missing_matplotlib_fails_before_computing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "matplotlib" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert main(["demo", "--out", str(tmp_path / "d")]) == EXIT_BAD_INPUT
    assert "pip install 'hessian-eigenthings[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # nothing was computed or written


def test_analyze_nothing_to_compute_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["analyze", "--model", str(tmp_path), "--text", "t.txt", "--k", "0"]
    assert main(argv) == EXIT_BAD_INPUT
    assert "nothing to compute" in capsys.readouterr().err


# -- issue 18: both ends, controls, checkpoints, torchrun ---------------------------------


def test_parser_new_options_and_their_defaults() -> None:
    base = ["analyze", "--model", "m", "--text", "t"]
    args = build_parser().parse_args(base)
    assert args.which == "LM"  # as the library's lanczos
    assert args.tol is None and args.lanczos_matvecs is None and args.trace_matvecs == 60
    assert args.microbatch_size is None and args.checkpoint is None and args.time_limit is None
    args = build_parser().parse_args(
        [
            *base, "--which", "SA", "--tol", "1e-3", "--lanczos-matvecs", "500",
            "--trace-matvecs", "90", "--microbatch-size", "2", "--checkpoint", "ck",
            "--time-limit", "3600",
        ]
    )  # fmt: skip
    assert (args.which, args.tol, args.lanczos_matvecs, args.trace_matvecs) == (
        "SA",
        1e-3,
        500,
        90,
    )
    assert (args.microbatch_size, args.checkpoint, args.time_limit) == (2, "ck", 3600.0)
    with pytest.warns(DeprecationWarning, match="use --trace-matvecs"):
        args = build_parser().parse_args([*base, "--num-matvecs", "12"])
    assert args.trace_matvecs == 12
    assert build_parser().parse_args(["demo"]).which == "LM"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--which", "BE"], "argument --which: invalid choice: 'BE'"),
        (["--tol", "0"], "argument --tol: expected a number in (0, 1), got 0"),
        (["--tol", "1.5"], "argument --tol: expected a number in (0, 1), got 1.5"),
        (["--time-limit", "0"], "argument --time-limit: expected a finite number of seconds"),
        (["--time-limit", "inf"], "argument --time-limit: expected a finite number of seconds"),
        (["--microbatch-size", "0"], "argument --microbatch-size: expected a positive integer"),
        (["--lanczos-matvecs", "-3"], "argument --lanczos-matvecs: expected a positive integer"),
    ],
)
def test_bad_option_values_exit_2(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["analyze", "--model", "m", "--text", "t", *extra])
    assert exc.value.code == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_analyze_smallest_end_with_microbatches_matches_dense(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sa"
    code = main(
        [
            "analyze", "--model", str(checkpoint), "--text", str(checkpoint.parent / "text.txt"),
            "--params", "transformer.h.1.ln_*", "--k", "2", "--which", "SA", "--tol", "1e-3",
            "--microbatch-size", "1", "--max-tokens", "150", "--block-size", "32",
            "--batch-size", "2", "--device", "cpu", "--out", str(out),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["eigen"]["which"] == "SA" and results["eigen"]["tol"] == 1e-3
    assert results["data"]["microbatch_size"] == 1
    H = reference_hessian(checkpoint, "transformer.h.1.ln_*", max_tokens=150, block=32)
    exact = torch.linalg.eigvalsh(H)[:2]  # the two smallest, increasing
    got = torch.tensor(results["eigen"]["eigenvalues"], dtype=torch.float64)
    bound = torch.tensor(results["eigen"]["residuals"], dtype=torch.float64)
    float32_rounding = 1e-5 * float(exact.abs().max())
    assert ((got - exact).abs() <= bound + float32_rounding).all(), (got, exact, bound)
    assert "Top-2 Hessian eigenvalues (smallest (algebraic)" in captured.out
    # without --density the other end is pointed at, and the mass is said to be missing
    assert "negative mass: not computed (add --density)" in captured.out
    assert "only the smallest (algebraic) end was searched" in captured.out
    assert "negative end dominates" not in captured.out  # the positive end is unknown


def test_one_batch_is_singular(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "analyze", "--model", str(checkpoint), "--text", str(checkpoint.parent / "text.txt"),
            "--params", "transformer.ln_f.*", "--k", "1", "--max-tokens", "20",
            "--block-size", "32", "--device", "cpu", "--out", str(tmp_path / "one"),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "20 tokens in 1 batch (19 next-token targets)" in out
    assert "1 batches" not in out and "1 runs" not in out


def test_trace_error_bar_hint_follows_the_rule(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hint appears exactly when stderr > |estimate| / 10, and names the option."""
    seen = set()
    for matvecs in ("4", "40"):
        out_dir = tmp_path / matvecs
        code = main(
            [
                "analyze", "--model", str(checkpoint),
                "--text", str(checkpoint.parent / "text.txt"), "--params", "transformer.h.1.*",
                "--k", "0", "--trace", "--trace-matvecs", matvecs, "--max-tokens", "64",
                "--block-size", "32", "--device", "cpu", "--out", str(out_dir),
            ]
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0
        tr = json.loads((out_dir / "results.json").read_text())["trace"]
        wide = tr["stderr"] > 0.1 * abs(tr["estimate"])
        seen.add(wide)
        hint = (
            "the error bar is larger than a tenth of the estimate; "
            f"raise --trace-matvecs (now {matvecs})"
        )
        assert (hint in out) == wide, out
        if wide:
            assert f"Hessian trace {tr['estimate']:.3g} +/- {tr['stderr']:.2g}" in out
    assert True in seen  # 4 products give a wide error bar on this model


def test_checkpoint_without_tokenizer_files_is_bad_input(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, bare / name)
    code = main(_analyze_in_process(checkpoint, tmp_path, **{"--model": str(bare)}))
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert "has a model but no tokenizer files: expected tokenizer.json" in err
    assert "got none" in err and "tokenizer.save_pretrained(dir)" in err
    assert "--text" not in err  # the old report blamed the text ("gives 0 token(s)")


def _run_analyze_json(argv: list[str], out: Path) -> tuple[int, dict[str, Any]]:
    code = main([*argv, "--out", str(out)])
    return code, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(
    checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[str], dict[str, Any]]:
    """Arguments of a small three-stage analysis, and its results without interruption."""
    argv = [
        "analyze", "--model", str(checkpoint), "--text", str(checkpoint.parent / "text.txt"),
        "--params", "transformer.h.1.ln_*", "--k", "2", "--trace", "--trace-matvecs", "24",
        "--density", "--density-runs", "3", "--density-steps", "8", "--max-tokens", "96",
        "--block-size", "32", "--device", "cpu",
    ]  # fmt: skip
    code, plain = _run_analyze_json(argv, tmp_path_factory.mktemp("plain"))
    assert code == 0
    return argv, plain


@pytest.mark.parametrize("cut", ["eigen", "trace", "density"])
def test_time_limit_checkpoint_resume_and_reuse(
    uninterrupted: tuple[list[str], dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cut: str,
) -> None:
    """--time-limit stops stage ``cut`` (exit 3, partial results, its checkpoint kept;
    the later stages do not start); the rerun reuses the finished stages, continues the
    cut one from its checkpoint and ends with the numbers of an uninterrupted run; a
    third run reuses everything; other arguments with the same folder are refused."""
    from hessian_eigenthings.cli import stages as stages_module
    from hessian_eigenthings.cli.errors import EXIT_TIME_LIMIT

    argv, plain = uninterrupted
    order = ["eigen", "trace", "density"]
    ck = tmp_path / "ck"

    # 1. Stage `cut` starts with almost no time left: it does its first unit of work
    # (a convergence check, a probe block, a run) and stops.
    calls = iter(order)

    def remaining(self: Any) -> float | None:
        return 1e-9 if next(calls) == cut else None

    monkeypatch.setattr(stages_module.Stages, "remaining", remaining)
    code, first = _run_analyze_json(
        [*argv, "--checkpoint", str(ck), "--time-limit", "600"], tmp_path / "first"
    )
    out = capsys.readouterr().out
    monkeypatch.undo()
    i = order.index(cut)
    assert code == EXIT_TIME_LIMIT and not first["complete"]
    expected = ["computed"] * i + ["time_limit"] + ["not_started"] * (2 - i)
    assert [first["stages"][s]["status"] for s in order] == expected
    files = sorted(p.name for p in ck.iterdir())
    assert files == sorted([f"{s}.result.json" for s in order[:i]] + [f"{cut}.ckpt"])
    partial = {
        "eigen": lambda r: r["eigen"]["num_matvecs"] < plain["eigen"]["num_matvecs"],
        "trace": lambda r: r["trace"]["num_matvecs"] < 24,
        # the runs advance in lockstep: a cut density has all runs, each cut short
        "density": lambda r: (
            r["spectral_density"]["num_matvecs"] < plain["spectral_density"]["num_matvecs"]
        ),
    }
    assert partial[cut](first)
    assert "rerun the same command to continue from the checkpoints" in out

    # 2. The rerun continues to the numbers of the uninterrupted run.
    code, second = _run_analyze_json([*argv, "--checkpoint", str(ck)], tmp_path / "second")
    assert code == 0 and second["complete"]
    assert [second["stages"][s]["status"] for s in order] == ["reused"] * i + ["computed"] * (3 - i)
    assert second["eigen"]["eigenvalues"] == plain["eigen"]["eigenvalues"]
    assert second["trace"]["estimate"] == plain["trace"]["estimate"]
    assert second["spectral_density"]["nodes"] == plain["spectral_density"]["nodes"]
    assert sorted(p.name for p in ck.iterdir()) == [f"{s}.result.json" for s in sorted(order)]

    # 3. Finished stages are reused, not recomputed.
    capsys.readouterr()
    code, third = _run_analyze_json([*argv, "--checkpoint", str(ck)], tmp_path / "third")
    out = capsys.readouterr().out
    assert code == 0
    assert all(v["status"] == "reused" for v in third["stages"].values())
    assert third["eigen"]["eigenvalues"] == plain["eigen"]["eigenvalues"]
    assert third["trace"] == second["trace"]
    assert third["spectral_density"]["nodes"] == plain["spectral_density"]["nodes"]
    assert "Reused finished stages from --checkpoint" in out

    # 4. Other arguments with the same folder: refused, with the difference named.
    code = main([*argv, "--seed", "7", "--checkpoint", str(ck), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "config.seed: this run 7, the file 0" in err and "another --checkpoint folder" in err


def test_reporter_prints_on_rank_zero_only(capsys: pytest.CaptureFixture[str]) -> None:
    from hessian_eigenthings.cli.progress import Reporter

    Reporter(quiet=False, progress=True, rank=1).say("from rank 1")
    Reporter(quiet=False, progress=False, rank=0).say("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"
    assert not Reporter(quiet=False, progress=True, rank=1).progress


def test_errors_are_rank_prefixed_under_torchrun(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["analyze", "--model", str(tmp_path / "nope"), "--text", "t.txt", "--device", "cpu"]
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("[rank 1] hessian-eigenthings analyze: error: --text")
    assert err.count("\n") == 1


@pytest.mark.distributed
def test_analyze_under_torchrun_matches_single_process(checkpoint: Path, tmp_path: Path) -> None:
    """Two gloo ranks split the blocks; rank 0 alone prints and writes; same numbers."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs gloo")
    argv = [
        "analyze", "--model", str(checkpoint), "--text", str(checkpoint.parent / "text.txt"),
        "--params", "transformer.h.1.ln_*", "--k", "2", "--trace", "--trace-matvecs", "24",
        "--max-tokens", "150", "--block-size", "32", "--batch-size", "1", "--device", "cpu",
    ]  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            MPLBACKEND="Agg",
            PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "hessian_eigenthings", *argv, "--out", str(tmp_path / "d")],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("torchrun analyze did not finish (a hang)")
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert outs[1][0] == ""  # rank 1 prints nothing
    lines = outs[0][0].splitlines()
    assert "split over 2 ranks" in lines[0]
    assert all(line.count("Hessian") <= 2 for line in lines)  # no two lines run together
    dist_results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert dist_results["data"]["world_size"] == 2

    code, single = _run_analyze_json(argv, tmp_path / "s")
    assert code == 0
    got = torch.tensor(dist_results["eigen"]["eigenvalues"], dtype=torch.float64)
    ref = torch.tensor(single["eigen"]["eigenvalues"], dtype=torch.float64)
    bound = torch.tensor(single["eigen"]["residuals"], dtype=torch.float64)
    assert ((got - ref).abs() <= 2 * bound + 1e-5 * float(ref.abs().max())).all()
    tr_d, tr_s = dist_results["trace"], single["trace"]
    assert abs(tr_d["estimate"] - tr_s["estimate"]) <= 1e-4 * abs(tr_s["estimate"]) + 1e-6

"""A script written for hessian-eigenthings 1.0.0a5 runs on this package.

Every call below uses the 1.0.0a5 public API as that release defined it (its names,
module paths, keywords, call styles and result attributes). Where the name or keyword
changed, the call still works and emits a ``DeprecationWarning`` that names the
replacement (``pytest.warns``); where this package deliberately computes something
different (sample-weighted batches, honest residuals, thick restarts), the test pins the
new behaviour and says so. Results are checked against dense float64 oracles.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import hessian_eigenthings as he
from hessian_eigenthings import (
    CurvatureOperator,
    EigenResult,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LambdaOperator,
    SpectralDensityResult,
    TraceResult,
    deflated_power_iteration,
    hutch_plus_plus,
    hutchinson,
    lanczos,
    lanczos_tridiagonal,
    match_names,
    match_regex,
    params_to_vector,
    power_iteration_one,
    select_parameters,
    spectral_density,
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
    supervised_per_sample_loss,
    trace,
    vector_to_params,
)
from hessian_eigenthings.operators import DDPHessianOperator
from tests.helpers import dense_hessian, rel_err

DEPRECATED = pytest.warns(DeprecationWarning)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(sizes=(6, 3)):
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for n in sizes
    ]


def _names(model):
    return [n for n, _ in model.named_parameters()]


def _dense_ggn(model, data):
    """sum_i J_i^T (diag p - p p^T) J_i / N over all samples (torch.func Jacobians)."""
    x = torch.cat([b[0] for b in data])
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda ps: torch.func.functional_call(model, ps, (x,)))(params)
    J = torch.cat([jac[n].reshape(x.shape[0], 3, -1) for n in params], dim=2)
    p = torch.softmax(model(x).detach(), dim=1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ica,icd,idb->ab", J, h, J) / x.shape[0]


def _dense_fisher(model, data):
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    params = {n: p.detach() for n, p in model.named_parameters()}

    def losses(ps):
        return nn.functional.cross_entropy(
            torch.func.functional_call(model, ps, (x,)), y, reduction="none"
        )

    jac = torch.func.jacrev(losses)(params)
    G = torch.cat([jac[n].reshape(x.shape[0], -1) for n in params], dim=1)
    return G.T @ G / x.shape[0]


def _diag_op(n=30, dtype=torch.float64):
    d = torch.linspace(1.0, 4.0, n, dtype=dtype)
    d[-1], d[-2] = 10.0, 8.0
    return LambdaOperator(lambda v: d * v, n, dtype=dtype), d


# ---------------------------------------------------------------- operators
def test_hessian_operator_1_0_0a5_style_is_sample_weighted():
    model, data = _model(), _data()
    loss = supervised_loss(nn.CrossEntropyLoss())
    dense = dense_hessian(model, data, loss, _names(model))
    op = HessianOperator(model, data, loss, param_filter=None, full_dataset=True, num_batches=None)
    v = torch.randn(op.size, dtype=torch.float64)
    assert rel_err(op.matvec(v), dense @ v) < 1e-10
    # Deliberate difference: 1.0.0a5 averaged the two batch means (6 and 3 samples) with
    # equal weights; this is the mean over all 9 samples.
    plain_mean = dense_hessian(model, data, loss, _names(model), weight=lambda b: 1)
    assert rel_err(plain_mean @ v, dense @ v) > 1e-2
    with DEPRECATED as rec:
        split = HessianOperator(model, data, loss, microbatch_size=2, microbatch_unsafe=True)
    assert "microbatch_unsafe" in str(rec[0].message)
    assert rel_err(split.matvec(v), dense @ v) < 1e-10
    fd = HessianOperator(model, data, loss, method="finite_difference", fd_eps=1e-4)
    assert rel_err(fd.matvec(v), dense @ v) < 1e-6


def test_ggn_with_supervised_loss_of_output():
    model, data = _model(), _data()
    dense = _dense_ggn(model, data)
    v = torch.randn(dense.shape[0], dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="cross_entropy_loss_of_output"):
        loss_of_output = supervised_loss_of_output(nn.CrossEntropyLoss())
    G = GGNOperator(model, data, supervised_forward, loss_of_output)
    assert rel_err(G.matvec(v), dense @ v) < 1e-10
    # any other criterion: exact loss Hessian by double backward (what 1.0.0a5 did)
    with DEPRECATED:
        doubled = supervised_loss_of_output(lambda out, y: 2 * nn.functional.cross_entropy(out, y))
    G2 = GGNOperator(model, data, supervised_forward, doubled)
    assert rel_err(G2.matvec(v), 2 * (dense @ v)) < 1e-10


def test_empirical_fisher_with_per_sample_loss_fn():
    model, data = _model(), _data()
    dense = _dense_fisher(model, data)
    v = torch.randn(dense.shape[0], dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="reduction='none'"):
        single = supervised_per_sample_loss(nn.CrossEntropyLoss())
    x, y = data[0]
    one = single(model, (x[0], y[0]))  # still the loss of one un-batched sample
    assert one.dim() == 0
    assert torch.allclose(one, nn.functional.cross_entropy(model(x[:1]), y[:1]))
    with pytest.warns(DeprecationWarning, match="per_sample_loss_fn"):
        F1 = EmpiricalFisherOperator(model, data, per_sample_loss_fn=single)
    assert rel_err(F1.matvec(v), dense @ v) < 1e-10
    F2 = EmpiricalFisherOperator(model, data, single)  # positional, as in 1.0.0a5
    assert rel_err(F2.matvec(v), dense @ v) < 1e-10

    def own(model, sample):  # a hand-written 1.0.0a5 per-sample loss, samples on dim 1
        xs, ys = sample
        return nn.functional.cross_entropy(model(xs[None]), ys)

    transposed = [(b[0].T.contiguous(), b[1][None]) for b in data]
    with pytest.warns(DeprecationWarning) as rec:
        F3 = EmpiricalFisherOperator(model, transposed, per_sample_loss_fn=own, sample_dim=1)
    assert {
        m for m in ("per_sample_loss_fn", "sample_dim") for w in rec if m in str(w.message)
    } == {
        "per_sample_loss_fn",
        "sample_dim",
    }
    assert rel_err(F3.matvec(v), dense @ v) < 1e-10
    with pytest.raises(TypeError, match="per_sample_loss_fn"):
        EmpiricalFisherOperator(model, data, single, per_sample_loss_fn=single)


def test_lambda_operator_1_0_0a5_call_styles():
    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    with pytest.warns(DeprecationWarning, match="dtype=..., device=..."):
        op = LambdaOperator(lambda v: A @ v, 5, "cpu", torch.float64)
    assert op.dtype == torch.float64 and op.device == torch.device("cpu")
    with pytest.warns(DeprecationWarning, match="matvec_fn"):
        op2 = LambdaOperator(matvec=lambda v: A @ v, size=5, dtype=torch.float64)
    v = torch.ones(5, dtype=torch.float64)
    assert torch.equal(op2.matvec(v), A @ v)
    with pytest.warns(DeprecationWarning, match="op.matvec"):
        assert torch.equal(op(v), A @ v)
    with pytest.warns(DeprecationWarning, match="symmetric"):
        assert torch.equal(op.rmatvec(v), A @ v)


def test_custom_operator_subclass_overriding_matvec():
    A = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))

    with pytest.warns(DeprecationWarning, match="_matvec"):

        class Diagonal(CurvatureOperator):  # the 1.0.0a5 way: override matvec
            size = 8
            device = torch.device("cpu")
            dtype = torch.float64

            def matvec(self, v):
                return A @ v

    res = lanczos(Diagonal(), k=2, seed=0)
    assert torch.allclose(res.eigenvalues, torch.tensor([8.0, 7.0], dtype=torch.float64))


def test_ddp_hessian_operator_path_and_clear_error_without_process_group():
    assert DDPHessianOperator is he.operators.distributed.DDPHessianOperator
    assert issubclass(DDPHessianOperator, HessianOperator)
    with pytest.raises(RuntimeError, match="init_process_group"):
        DDPHessianOperator(_model(), _data(), supervised_loss(nn.CrossEntropyLoss()))


# ---------------------------------------------------------------- algorithms and results
def test_lanczos_1_0_0a5_call_and_result():
    model, data = _model(), _data()
    loss = supervised_loss(nn.CrossEntropyLoss())
    op = HessianOperator(model, data, loss)
    exact = np.linalg.eigvalsh(dense_hessian(model, data, loss, _names(model)).numpy())
    with pytest.warns(DeprecationWarning, match="reorthogonalize=True"):
        res = lanczos(
            op,
            k=3,
            max_iter=400,
            tol=1e-8,
            reorthogonalize=None,
            which="LA",
            seed=0,
            backend=he.SingleDeviceBackend(),
        )
    assert isinstance(res, EigenResult)
    eigenvalues, eigenvectors = res
    assert np.allclose(eigenvalues.numpy(), exact[::-1][:3], rtol=1e-7, atol=1e-10)
    assert eigenvectors.shape == (3, op.size)
    assert res.converged.dtype == torch.bool and bool(res.converged.all())
    # honest residuals: ||H v - lambda v|| of the returned pairs, recomputed here
    true = torch.stack([op.matvec(q) - lam * q for lam, q in zip(eigenvalues, eigenvectors)])
    assert torch.all(true.norm(dim=1) <= res.residuals * (1 + 1e-6) + 1e-12)
    # Deliberate difference: `iterations` counts thick restarts (1.0.0a5: Lanczos steps,
    # which were its matvecs); the matvecs are `num_matvecs`.
    assert isinstance(res.iterations, int) and res.num_matvecs >= res.iterations


def test_lanczos_tridiagonal_fields():
    op, d = _diag_op()
    td = lanczos_tridiagonal(op, torch.ones(30, dtype=torch.float64), 30, reorthogonalize=True)
    theta = torch.linalg.eigvalsh(td.matrix())
    assert torch.allclose(theta.max(), d.max()) and td.iterations <= 30
    assert td.alphas.shape == (td.iterations,) and td.betas.shape == (td.iterations - 1,)
    assert float(td.last_beta) >= 0


def test_power_iteration_keywords():
    op, _ = _diag_op()
    with pytest.warns(DeprecationWarning, match="k=..."):
        res = deflated_power_iteration(op, num_eigs=2, max_iter=5000, tol=1e-9, seed=0)
    assert torch.allclose(res.eigenvalues, torch.tensor([10.0, 8.0], dtype=torch.float64))
    with pytest.warns(DeprecationWarning, match="momentum"):
        deflated_power_iteration(op, k=1, momentum=0.0, seed=0)
    with pytest.raises(TypeError, match="stochastic_power_iteration"):
        deflated_power_iteration(op, k=1, momentum=0.5, seed=0)
    init = torch.ones(30, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="init_vec"):
        one = power_iteration_one(op, max_iter=5000, tol=1e-9, init=init)
    # Deliberate difference: an EigenResult with k = 1 (1.0.0a5 returned a 5-tuple)
    value, vector = one
    assert torch.allclose(value, torch.tensor([10.0], dtype=torch.float64))
    assert vector.shape == (1, 30)


def test_trace_estimators_1_0_0a5_keywords():
    op, d = _diag_op()
    exact = float(d.sum())
    res = trace(op, num_matvecs=99, method="hutch++", distribution="rademacher", seed=0)
    assert isinstance(res, TraceResult)
    assert math.isclose(res.estimate, exact, rel_tol=1e-10)  # sketch spans the space
    with pytest.warns(DeprecationWarning, match="num_matvecs"):
        hres = hutchinson(op, num_samples=20, distribution="rademacher", seed=0)
    # Rademacher probes of a diagonal matrix: every sample is exactly tr(D)
    assert np.allclose(hres.samples, exact) and math.isclose(hres.estimate, exact)
    assert hres.samples.shape == (20,) and hres.stderr < 1e-12
    pp = hutch_plus_plus(op, num_matvecs=99, seed=0)
    assert math.isclose(pp.estimate, exact, rel_tol=1e-10)


def test_spectral_density_grid_padding_and_raw_quadrature():
    op, _ = _diag_op()
    with pytest.warns(DeprecationWarning, match="grid_padding"):
        res = spectral_density(
            op,
            num_runs=4,
            lanczos_steps=30,
            num_grid_points=2000,
            sigma=0.05,
            grid_padding=0.1,
            seed=0,
        )
    assert isinstance(res, SpectralDensityResult)
    nodes = np.concatenate(res.nodes)
    lo, hi = nodes.min(), nodes.max()
    assert math.isclose(res.grid[0], lo - 0.1 * (hi - lo), rel_tol=1e-12)
    assert math.isclose(res.grid[-1], hi + 0.1 * (hi - lo), rel_tol=1e-12)
    assert res.grid.size == 2000 and res.sigma == 0.05
    assert abs(res.integral() - 1.0) < 1e-3
    with pytest.warns(DeprecationWarning, match="nodes"):
        raw = res.raw_eigenvalues
    with pytest.warns(DeprecationWarning, match="weights"):
        raw_w = res.raw_weights
    assert raw.shape == raw_w.shape == (4, max(n.size for n in res.nodes))
    assert torch.allclose(raw_w.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(raw[0, : res.nodes[0].size], torch.from_numpy(res.nodes[0]))
    # a full Krylov space: the Ritz values are the eigenvalues
    assert math.isclose(float(np.nanmax(raw.numpy())), 10.0, rel_tol=1e-10)


# ---------------------------------------------------------------- parameters and modules
def test_param_utils_1_0_0a5():
    model = _model()
    with pytest.warns(DeprecationWarning, match="select_params"):
        params = select_parameters(model, match_names("0.*"))
    assert list(params) == ["0.weight", "0.bias"]
    assert isinstance(params["0.weight"], nn.Parameter)
    with pytest.warns(DeprecationWarning, match="flatten"):
        vec = params_to_vector(params)
    assert torch.equal(vec, torch.cat([params["0.weight"].reshape(-1), params["0.bias"]]))
    with pytest.warns(DeprecationWarning, match="unflatten"):
        back = vector_to_params(vec, params)
    assert list(back) == list(params)
    assert all(torch.equal(back[n], params[n]) for n in params)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="flat vector"):
        vector_to_params(vec[:-1], params)
    from hessian_eigenthings.param_utils import total_size

    with pytest.warns(DeprecationWarning):
        assert total_size(params) == vec.numel()
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="selected no"):
        select_parameters(model, match_regex("^nothing$"))


def test_linalg_and_batching_module_paths():
    with pytest.warns(DeprecationWarning, match="hessian_eigenthings.backends"):
        from hessian_eigenthings.linalg import SingleDeviceBackend
    assert SingleDeviceBackend is he.SingleDeviceBackend
    with pytest.warns(DeprecationWarning):
        from hessian_eigenthings.linalg.backend import LinAlgBackend
    assert LinAlgBackend is he.LinAlgBackend
    from hessian_eigenthings.batching import (
        assert_microbatch_safe,
        iterate_batches,
        move_batch_to_device,
    )

    data = _data((2, 2, 2))
    with pytest.warns(DeprecationWarning):
        assert len(list(iterate_batches(data, 2))) == 2
    with pytest.warns(DeprecationWarning):
        moved = move_batch_to_device({"x": data[0]}, "cpu")
    assert torch.equal(moved["x"][0], data[0][0])
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="BatchNorm"):
        assert_microbatch_safe(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def test_loss_factories_1_0_0a5():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=11,
        d_model=8,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=8,
        decoder_ffn_dim=8,
        max_position_embeddings=8,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    model = transformers.BartForConditionalGeneration(cfg).eval()
    labels = torch.tensor([[4, 5, 6], [7, -100, -100]])
    batch = {"input_ids": torch.tensor([[3, 4, 5], [6, 7, 8]]), "labels": labels}
    loss_fn = he.hf_seq2seq_loss()
    assert torch.equal(loss_fn(model, batch), model(**batch).loss)
    assert int(loss_fn.batch_weight(batch)) == 4
    # 1.0.0a5's factory call of the forward function still works, and says it is not needed
    with pytest.warns(DeprecationWarning, match="pass hf_lm_forward without calling it"):
        assert he.hf_lm_forward() is he.hf_lm_forward
    assert callable(he.hf_lm_loss_of_output())

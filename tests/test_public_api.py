"""Every import path the manual's examples and SPEC section 2 promise."""

from __future__ import annotations

import importlib

import pytest

import hessian_eigenthings as he

TOP_LEVEL = [
    "CurvatureOperator",
    "LambdaOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "lanczos",
    "lanczos_tridiagonal",
    "deflated_power_iteration",
    "stochastic_power_iteration",
    "trace",
    "hutchinson",
    "hutch_plus_plus",
    "xtrace",
    "diagonal",
    "spectral_density",
    "EigenResult",
    "TraceResult",
    "SpectralDensityResult",
    "LinAlgBackend",
    "SingleDeviceBackend",
    "ParamFilter",
    "match_names",
    "match_regex",
    "flatten",
    "unflatten",
]

PATHS = [
    ("hessian_eigenthings.param_utils", "match_names"),
    ("hessian_eigenthings.util", "match_names"),
    ("hessian_eigenthings.operators", "HessianOperator"),
    ("hessian_eigenthings.operators", "GGNOperator"),
    ("hessian_eigenthings.operators", "CurvatureOperator"),
    ("hessian_eigenthings.operators.distributed", "DDPHessianOperator"),
    ("hessian_eigenthings.algorithms", "power_iteration_one"),
    ("hessian_eigenthings.algorithms", "lanczos"),
    ("hessian_eigenthings.algorithms", "stochastic_power_iteration"),
    ("hessian_eigenthings.algorithms", "trace"),
    ("hessian_eigenthings.algorithms", "spectral_density"),
    ("hessian_eigenthings.loss_fns.standard", "cross_entropy_loss_of_output"),
    ("hessian_eigenthings.loss_fns.standard", "mse_loss_of_output"),
    ("hessian_eigenthings.loss_fns.huggingface", "hf_lm_loss"),
    ("hessian_eigenthings.loss_fns.transformer_lens", "tlens_loss"),
    ("hessian_eigenthings.backends", "SingleDeviceBackend"),
]


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_names(name: str) -> None:
    assert hasattr(he, name), f"hessian_eigenthings.{name} is missing"
    assert name in he.__all__


@pytest.mark.parametrize(("module", "name"), PATHS)
def test_import_paths(module: str, name: str) -> None:
    mod = importlib.import_module(module)
    assert hasattr(mod, name), f"{module}.{name} is missing"


def test_all_names_resolve() -> None:
    for name in he.__all__:
        assert hasattr(he, name), name

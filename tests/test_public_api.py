"""Every import path the manual's examples and SPEC section 2 promise."""

from __future__ import annotations

import importlib

import pytest

import hessian_eigenthings as he

TOP_LEVEL = [
    # the manual's names, every top-level name of the previous release (DDPOperatorMixin:
    # see RENAMED_CLASSES) and the new ones
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
    "OutputCurvatureOperator",
    "DDPCurvatureOperator",
    "hf_lm_loss_of_output",
    "tlens_loss_of_output",
    "hf_lm_forward",
    "tlens_forward",
    "DataCurvatureOperator",
    "MCFisherOperator",
    "DDPEmpiricalFisherOperator",
    "DDPGGNOperator",
    "DDPHessianOperator",
    "ShardedHessianOperator",
    "LanczosProgress",
    "StochasticEigenResult",
    "power_iteration_one",
    "DiagonalResult",
    "LanczosTridiag",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "NonFiniteError",
    "LossOfOutput",
    "cross_entropy_loss_of_output",
    "loss_of_output",
    "mse_loss_of_output",
    "supervised_forward",
    "supervised_loss",
    "fused_ce_hvp",
    "hf_lm_loss",
    "hf_lm_shifted_ce",
    "linear_ce_ggn_product",
    "tlens_loss",
    "ReplicatedBackend",
    "ShardedBackend",
    "ParamLayout",
    "select_params",
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
    ("hessian_eigenthings.operators", "OutputCurvatureOperator"),
    ("hessian_eigenthings.operators.distributed", "DDPCurvatureOperator"),
    ("hessian_eigenthings.operators.distributed", "ShardedHessianOperator"),
    ("hessian_eigenthings.loss_fns.huggingface", "hf_lm_loss_of_output"),
]

# Renamed classes: (module, old name, new name); the old name resolves to the same class.
RENAMED_CLASSES = [
    (module, "DDPOperatorMixin", "DDPCurvatureOperator")
    for module in (
        "hessian_eigenthings",
        "hessian_eigenthings.operators.distributed",
        "hessian_eigenthings.operators.distributed.ddp",
    )
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


@pytest.mark.parametrize(("module", "old", "new"), RENAMED_CLASSES)
def test_renamed_classes_resolve_with_a_deprecation_warning(
    module: str, old: str, new: str
) -> None:
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*use {new}"):
        cls = getattr(mod, old)
    assert cls is getattr(mod, new)
    assert old not in mod.__all__  # star imports stay silent
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        _ = mod.NoSuchName


def test_renamed_functions_warn_when_called_and_star_import_is_silent() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        exec("from hessian_eigenthings import *", {})
        assert callable(he.hf_lm_shifted_ce)  # importing the alias does not warn
    with pytest.warns(
        DeprecationWarning, match="hf_lm_shifted_ce is deprecated.*hf_lm_loss_of_output"
    ):
        loss = he.hf_lm_shifted_ce(fused="eager")
    assert loss.name == "hf_lm_loss_of_output"

"""Bad input and edge cases: clear errors, exclusions, graph breaks, recompiles after calibration."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

import qcompile as qc
from simulation import (
    MAX_VARIANTS,
    STATIC_RECIPES,
    assert_matches_simulation,
    backend_error,
    call,
    mlp_batch,
    primary_output,
    recipe_for,
    rel,
    simulate,
    tiny_llama,
    tiny_mlp,
    to_double,
    token_batch,
)


def _calib(n=3):
    return [mlp_batch(2, 8, 100 + i) for i in range(n)]


def _compile(model, **options):
    options.setdefault("compiler", "eager")
    if options.get("recipe") in MAX_VARIANTS:
        options["recipe"] = recipe_for(options["recipe"])
    return torch.compile(model, backend="quant", options=options)


def _simulated(model, recipe, calib, x, **kwargs):
    with torch.no_grad():
        return primary_output(call(simulate(model, recipe, calib, **kwargs), to_double(x)))


# --------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("recipe", ["fp8", "int8_sq"])
def test_non_finite_calibration_batch_names_the_layer(recipe, bad):
    calib = _calib()
    calib[1][0, 3, 5] = bad  # not the first batch: capture itself is fine, calibration must catch it
    with pytest.raises(ValueError, match=r"layer '0'"):
        qc.quantize(tiny_mlp(), recipe, calib=calib, progress=False)


def test_non_finite_activation_inside_the_model_names_that_layer():
    """Finite inputs whose float activations overflow: the first quantized layer that sees inf is named."""
    model = tiny_mlp()
    with torch.no_grad():
        model[0].weight[0, :] = 3e38  # float layer "0" overflows to ±inf; GELU passes inf (and makes NaN of -inf)
    with pytest.raises(ValueError, match=r"layer '2'"):
        qc.quantize(model, "fp8", calib=_calib(), exclude=["0"], progress=False)


def test_non_finite_calibration_batch_under_torch_compile():
    compiled = _compile(tiny_mlp(), recipe="nvfp4")
    calib = _calib()
    calib[0][1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"layer '0'"):
        with qc.calibrate(compiled):
            for batch in calib:
                compiled(batch)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("recipe", ["fp8_dynamic", "int4_awq", "nvfp4"])
def test_non_finite_weight_names_the_layer(recipe, bad):
    model = tiny_mlp()
    with torch.no_grad():
        model[2].weight[3, 4] = bad
    with pytest.raises(ValueError, match=r"weight of layer '2'"):
        qc.quantize(model, recipe, calib=_calib(), progress=False)


@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_non_finite_weight_under_torch_compile(recipe):
    model = tiny_mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    compiled = _compile(model, recipe=recipe)
    with pytest.raises(Exception) as excinfo:
        with qc.calibrate(compiled) if recipe in STATIC_RECIPES else contextlib.nullcontext():
            compiled(mlp_batch(2, 8, 1))
    # The weight is named, not the next layer whose calibration input it turns into NaN.
    error = backend_error(excinfo.value)
    assert isinstance(error, ValueError) and "weight of layer '2'" in str(error)


def test_non_finite_weight_in_an_excluded_layer_is_not_an_error():
    model = tiny_mlp()
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")  # a float layer's NaN is the model's business
    qm = qc.quantize(model, "fp8_dynamic", example_inputs=(mlp_batch(2, 8, 1),), exclude=["4"], progress=False)
    assert [layer.name for layer in qm.layers] == ["0", "2"]


# ------------------------------------------------------------------------------------------ calibration sets


@pytest.mark.parametrize("recipe", STATIC_RECIPES)
def test_static_recipe_needs_calibration_data(recipe):
    model, x = tiny_mlp(), mlp_batch(2, 8, 1)
    with pytest.raises(ValueError, match="empty"):
        qc.quantize(model, recipe, calib=[], example_inputs=(x,), progress=False)
    with pytest.raises(ValueError, match="empty"):
        qc.quantize(model, recipe, calib=iter([]), example_inputs=(x,), progress=False)
    with pytest.raises(ValueError, match="empty"):
        qc.quantize(model, recipe, calib=[], progress=False)
    with pytest.raises(ValueError, match="calib"):
        qc.quantize(model, recipe, calib=None, example_inputs=(x,), progress=False)


def test_quantize_needs_something_to_capture_with():
    with pytest.raises(ValueError, match="example_inputs"):
        qc.quantize(tiny_mlp(), "fp8_dynamic", progress=False)


def test_dynamic_and_weight_only_recipes_need_no_calibration():
    x = mlp_batch(2, 8, 1)
    for recipe in ("fp8_dynamic", "int8_dynamic", "fp8_block", "nvfp4_weight_only"):
        qm = qc.quantize(tiny_mlp(), recipe, example_inputs=(x,), progress=False)
        assert len(qm.layers) == 3


def test_empty_calibrate_block_under_torch_compile():
    compiled = _compile(tiny_mlp(), recipe="fp8")
    with pytest.raises(ValueError, match="calibrat"):
        with qc.calibrate(compiled):
            pass


@pytest.mark.parametrize("recipe", STATIC_RECIPES)
def test_uncalibrated_static_recipe_under_torch_compile(recipe):
    compiled = _compile(tiny_mlp(), recipe=recipe)
    with pytest.raises(RuntimeError, match=r"qcompile\.calibrate"):
        compiled(mlp_batch(2, 8, 1))


# -------------------------------------------------------------------------------------- names and options


def test_model_without_linear_layers_comes_back_unchanged():
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="no linear layer"):
        out = qc.quantize(model, "fp8_dynamic", example_inputs=(torch.randn(2, 4, 10),), progress=False)
    assert out is model


def test_model_whose_every_linear_is_excluded_comes_back_unchanged():
    model = tiny_mlp()
    with pytest.warns(UserWarning, match="no linear layer"):
        out = qc.quantize(model, "int4_awq", example_inputs=(mlp_batch(2, 8, 1),), exclude=["*"], progress=False)
    assert out is model


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown recipe") as excinfo:
        qc.quantize(tiny_mlp(), "fp6", example_inputs=(mlp_batch(2, 8, 1),), progress=False)
    assert all(name in str(excinfo.value) for name in qc.RECIPES)


def test_unknown_recipe_under_torch_compile_lists_the_valid_ones():
    with pytest.raises(Exception) as excinfo:
        _compile(tiny_mlp(), recipe="fp6")(mlp_batch(2, 8, 1))
    error = backend_error(excinfo.value)
    assert isinstance(error, ValueError)
    assert all(name in str(error) for name in qc.RECIPES)


@pytest.mark.parametrize("options", [{"recipe": "fp8_dynamic", "recipes": "x"}, {"mode": "fast"}])
def test_unknown_torch_compile_option_lists_the_valid_ones(options):
    compiled = torch.compile(tiny_mlp(), backend="quant", options=options)
    with pytest.raises(Exception) as excinfo:
        compiled(mlp_batch(2, 8, 1))
    # Dynamo wraps what a backend raises in BackendCompilerFailed; the backend's own error is a ValueError.
    error = backend_error(excinfo.value)
    assert isinstance(error, ValueError)
    assert all(option in str(error) for option in ("recipe", "exclude", "compiler"))


def test_unknown_compiler_option():
    with pytest.raises(Exception) as excinfo:
        _compile(tiny_mlp(), recipe="fp8_dynamic", compiler="tensorrt")(mlp_batch(2, 8, 1))
    error = backend_error(excinfo.value)
    assert isinstance(error, ValueError) and "inductor" in str(error) and "eager" in str(error)


def test_recipe_objects_and_replace():
    """A Recipe is accepted wherever a name is; dataclasses.replace derives variants (docs/formats.md#recipes)."""
    import dataclasses

    recipe = dataclasses.replace(qc.RECIPES["int8_sq"], algorithm="max")
    calib, x = _calib(), mlp_batch(3, 5, 7)
    model = tiny_mlp()
    qm = qc.quantize(model, recipe, calib=calib, progress=False)
    assert qm.algorithm == "max"
    with torch.no_grad():
        y, y_float = qm(x), model(x)
    assert_matches_simulation(y, _simulated(model, "int8_sq_max", calib, x), y_float, "int8_sq_max")
    with pytest.raises(ValueError):
        dataclasses.replace(recipe, algorithm="magic")
    with pytest.raises(ValueError):
        qc.QuantSpec("fp6")


# -------------------------------------------------------------------------------------------------- exclude


def test_exclude_globs_leave_matching_layers_in_float():
    model = tiny_llama()
    calib = [token_batch(2, 8, 100 + i) for i in range(3)]
    exclude = ["*lm_head*", "*embed*", "*mlp*", "model.layers.1.self_attn.[qk]_proj"]
    qm = qc.quantize(model, "fp8", calib=calib, exclude=exclude, progress=False)
    names = [layer.name for layer in qm.layers]
    assert names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    report = qm.report()
    assert all(name in report for name in names)
    assert "mlp" not in report and "lm_head" not in report
    x = token_batch(3, 5, 7)
    with torch.no_grad():
        y, y_float = qm(x).logits, model(x).logits
    assert_matches_simulation(y, _simulated(model, "fp8", calib, x, exclude=exclude), y_float, "fp8")


@pytest.mark.parametrize("path", ["quantize", "compile"])
@pytest.mark.parametrize("recipe", ["int8_sq_max", "nvfp4_weight_only"])
def test_all_layers_but_one_excluded(recipe, path):
    model, calib, x = tiny_mlp(), _calib(), mlp_batch(3, 5, 7)
    exclude = ["0", "4"]
    if path == "quantize":
        qm = qc.quantize(model, recipe_for(recipe), calib=calib, exclude=exclude, progress=False)
        assert [layer.name for layer in qm.layers] == ["2"]
        run = qm
    else:
        run = _compile(model, recipe=recipe, exclude=exclude)
        if recipe != "nvfp4_weight_only":
            with qc.calibrate(run):
                for batch in calib:
                    run(batch)
    with torch.no_grad():
        y, y_float = run(x), model(x)
    y_sim = _simulated(model, recipe, calib, x, exclude=exclude)
    assert_matches_simulation(y, y_sim, y_float, recipe)
    # ... and it is not the model with every layer quantized.
    assert rel(y, _simulated(model, recipe, calib, x)) > 1e-3


# ------------------------------------------------------------------------------- graph breaks and recompiles


class TwoLinearsWithAGraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(40, 64)
        self.second = nn.Linear(64, 24)

    def forward(self, x):
        h = torch.relu(self.first(x))
        torch._dynamo.graph_break()
        return self.second(h) * 2.0


@pytest.mark.parametrize("recipe", ["fp8", "int8_sq_max", "nvfp4"])
def test_graph_break_every_subgraph_is_calibrated_and_quantized(recipe):
    model = TwoLinearsWithAGraphBreak().eval()
    calib, x = _calib(), mlp_batch(3, 5, 7)
    compiled = _compile(model, recipe=recipe)
    with qc.calibrate(compiled):
        for batch in calib:
            compiled(batch)
    with torch.no_grad():
        y, y_float = compiled(x), model(x)
    assert_matches_simulation(y, _simulated(model, recipe, calib, x), y_float, recipe)
    # Quantizing only one of the two linears gives a measurably different function.
    for only in ("first", "second"):
        assert rel(y, _simulated(model, recipe, calib, x, exclude=[only])) > 1e-3


@pytest.mark.parametrize("recipe", ["fp8", "w4a8_max", "nvfp4"])
def test_recompile_after_calibration_reuses_the_statistics(recipe):
    """New shapes after calibration compile new graphs; they use the calibrated scales and record nothing new."""
    model, calib = tiny_mlp(), _calib()
    compiled = _compile(model, recipe=recipe)
    with qc.calibrate(compiled):
        for batch in calib:
            compiled(batch)
    # Larger inputs than anything seen in calibration: static scales must clip/saturate them, as simulated.
    for x in (3.0 * mlp_batch(3, 5, 7), 3.0 * mlp_batch(6, 13, 5), mlp_batch(4, 6, 9)[0]):
        with torch.no_grad():
            y, y_float = compiled(x), model(x)
        assert_matches_simulation(y, _simulated(model, recipe, calib, x), y_float, recipe)


def test_recompile_of_a_graph_broken_model_after_calibration():
    model = TwoLinearsWithAGraphBreak().eval()
    calib = _calib()
    compiled = _compile(model, recipe="int8_sq_max")
    with qc.calibrate(compiled):
        for batch in calib:
            compiled(batch)
    x = mlp_batch(5, 3, 11)
    with torch.no_grad():
        y, y_float = compiled(x), model(x)
    assert_matches_simulation(y, _simulated(model, "int8_sq_max", calib, x), y_float, "int8_sq_max")


@pytest.mark.xfail(
    strict=True,
    reason="torch.compile wrappers with equal options compare equal, so dynamo reuses the first compile's graphs "
    "(and its calibration) for the second: the backend is never called again and qcompile.calibrate(b) finds no "
    "graph to observe",
)
def test_two_compiles_of_one_model_keep_their_own_statistics():
    """Calibrating one compiled copy must not calibrate (or change) another compile of the same model."""
    model = tiny_mlp()
    calib_a = _calib()
    calib_b = [10.0 * b for b in _calib()]
    a = _compile(model, recipe="fp8")
    with qc.calibrate(a):
        for batch in calib_a:
            a(batch)
    b = _compile(model, recipe="fp8")
    with qc.calibrate(b):
        for batch in calib_b:
            b(batch)
    x = mlp_batch(3, 5, 7)
    with torch.no_grad():
        ya, yb, y_float = a(x), b(x), model(x)
    assert_matches_simulation(ya, _simulated(model, "fp8", calib_a, x), y_float, "fp8")
    assert_matches_simulation(yb, _simulated(model, "fp8", calib_b, x), y_float, "fp8")


def test_no_warnings_on_the_happy_path():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        qm = qc.quantize(tiny_mlp(), "fp8", calib=_calib(), progress=False)
        with torch.no_grad():
            qm(mlp_batch(3, 5, 7))

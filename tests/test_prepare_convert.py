"""The staged pipeline (`qcompile.prepare` -> calibration batches -> `qcompile.convert`) and the algorithms'
declared needs and options (`qcompile.algorithms`)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import qcompile as qc


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    with torch.no_grad():  # a few outlier input channels, so that SmoothQuant and AWQ have something to move
        model[0].weight[:, :4] *= 0.05
    return model


def _calib(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 8, 64, generator=g) for _ in range(n)]
    for b in batches:
        b[..., :4] *= 20.0
    return batches


def _staged(model, recipe, calib, **convert_kwargs):
    prepared = qc.prepare(model, recipe, example_inputs=(calib[0],))
    for batch in calib:
        prepared(batch)
    return qc.convert(prepared, progress=False, **convert_kwargs)


@pytest.mark.parametrize("recipe", ["fp8", "int8_sq", "int4_awq", "w4a8_awq"])
def test_staged_pipeline_equals_quantize(recipe):
    model, calib, x = _mlp(), _calib(), torch.randn(3, 5, 64)
    whole = qc.quantize(model, recipe, calib=calib, progress=False)
    staged = _staged(model, recipe, calib)
    with torch.no_grad():
        assert torch.equal(staged(x), whole(x))
    assert staged.algorithm == whole.algorithm == qc.algorithms.describe(qc.RECIPES[recipe])


def test_sequential_gptq_reruns_the_batches_given_to_convert():
    model, calib, x = _mlp(), _calib(), torch.randn(3, 5, 64)
    whole = qc.quantize(model, "int4_gptq", calib=calib, progress=False)
    prepared = qc.prepare(model, "int4_gptq", example_inputs=(calib[0],))
    staged = qc.convert(prepared, calib=calib, progress=False)
    with torch.no_grad():
        assert torch.equal(staged(x), whole(x))
    assert "sequential" in staged.algorithm

    # without the batches, GPTQ runs its one-shot form on the x^T x observed while calibrating, and says so
    prepared = qc.prepare(model, "int4_gptq", example_inputs=(calib[0],))
    for batch in calib:
        prepared(batch)
    one_shot = qc.convert(prepared, progress=False)
    assert "one-shot" in one_shot.algorithm and "sequential" not in one_shot.algorithm
    with torch.no_grad():
        assert not torch.equal(one_shot(x), whole(x))


def test_one_calibration_converts_to_several_recipes():
    """A model prepared for AWQ (sampled rows and x^T x) converts with any recipe needing no more."""
    model, calib, x = _mlp(), _calib(), torch.randn(3, 5, 64)
    prepared = qc.prepare(model, "int4_awq", example_inputs=(calib[0],))
    for batch in calib:
        prepared(batch)
    for recipe in ("fp8", "nvfp4", "int8_dynamic"):
        got = qc.convert(copy.deepcopy(prepared), recipe=recipe, progress=False)
        want = qc.quantize(model, recipe, calib=calib, progress=False)
        with torch.no_grad():
            assert torch.equal(got(x), want(x)), recipe
        assert got.recipe.name == recipe


def test_convert_refuses_what_the_preparation_did_not_observe():
    model, calib = _mlp(), _calib()
    prepared = qc.prepare(model, "fp8", example_inputs=(calib[0],))  # input ranges only
    for batch in calib:
        prepared(batch)
    with pytest.raises(ValueError, match="int4_awq.*did not observe"):
        qc.convert(prepared, recipe="int4_awq", progress=False)


def test_convert_needs_calibration_and_happens_once():
    model, calib = _mlp(), _calib()
    prepared = qc.prepare(model, "fp8", example_inputs=(calib[0],))
    with pytest.raises(ValueError, match="call the prepared model on calibration batches"):
        qc.convert(prepared, progress=False)
    qm = qc.convert(prepared, calib=calib, progress=False)  # or hand the batches to convert
    assert isinstance(qm, qc.QuantizedModel)
    with pytest.raises(RuntimeError, match="already converted"):
        qc.convert(prepared, progress=False)
    with pytest.raises(RuntimeError, match="was converted"):
        prepared(calib[0])
    with pytest.raises(TypeError, match="qcompile.prepare"):
        qc.convert(_mlp())


def test_prepare_observes_only_what_the_algorithm_needs():
    model, calib = _mlp(), _calib(1)
    dynamic = qc.prepare(model, "fp8_dynamic", example_inputs=(calib[0],))
    assert dynamic.observers == {}  # nothing to measure: convert needs no batch
    assert isinstance(qc.convert(dynamic, progress=False), qc.QuantizedModel)
    awq = qc.prepare(model, "int4_awq", example_inputs=(calib[0],))
    awq(calib[0])
    observer = next(iter(awq.observers.values()))
    assert observer.sample is not None and observer.xtx is not None  # rows for its searches, x^T x for its error
    fp8 = qc.prepare(model, "fp8", example_inputs=(calib[0],))
    fp8(calib[0])
    observer = next(iter(fp8.observers.values()))
    assert observer.sample is None and observer.xtx is None and observer.amax is not None


# ------------------------------------------------------------------------------------------------- options


def _gptq(**options) -> qc.Recipe:
    return qc.Recipe(qc.QuantSpec("int4", "group", block_size=32), algorithm="gptq", name="gptq_test",
                     options=options)


def test_gptq_options_reach_the_algorithm_and_its_description():
    model, calib, x = _mlp(), _calib(), torch.randn(3, 5, 64)
    default = qc.quantize(model, _gptq(), calib=calib, progress=False)
    damped = qc.quantize(model, _gptq(damping=0.5, scale_ratios=[1.0]), calib=calib, progress=False)
    assert "damping 0.01, group scale search" in default.algorithm
    assert "damping 0.5" in damped.algorithm and "scale search" not in damped.algorithm
    with torch.no_grad():
        assert not torch.equal(default(x), damped(x))  # a different algorithm ran, not the defaults


def test_smoothquant_alpha_option():
    fixed = qc.Recipe(qc.QuantSpec("int8", "channel"), qc.QuantSpec("int8", "tensor"), "smoothquant",
                      options={"alpha": 0.8})
    assert qc.algorithms.describe(fixed) == "smoothquant (alpha 0.8)"
    assert qc.algorithms.needs(fixed).sampled_rows == 0  # a fixed alpha searches nothing
    assert qc.algorithms.needs(qc.RECIPES["int8_sq"]).sampled_rows > 0  # alpha="search"
    with pytest.raises(ValueError, match="alpha must be a number in"):
        qc.Recipe(qc.QuantSpec("int8", "channel"), qc.QuantSpec("int8", "tensor"), "smoothquant",
                  options={"alpha": 2.0})


def test_unknown_options_and_algorithms_are_errors_that_list_the_valid_ones():
    with pytest.raises(ValueError, match="no algorithm has an option 'dampening'.*gptq: block_size, damping"):
        _gptq(dampening=0.1)
    with pytest.raises(ValueError, match="unknown algorithm 'spinquant'.*max, smoothquant, awq, gptq"):
        qc.Recipe(qc.QuantSpec("int8", "channel"), algorithm="spinquant")
    # a recipe derived with another algorithm keeps options that algorithm does not read
    import dataclasses

    plain = dataclasses.replace(qc.RECIPES["int8_sq"], algorithm="max")
    assert qc.algorithms.options(plain) == {} and qc.algorithms.describe(plain) == "max"


def test_options_survive_save_and_load(tmp_path):
    model, calib = _mlp(), _calib(2)
    qm = qc.quantize(model, _gptq(damping=0.02, act_order=True), calib=calib, progress=False)
    qm.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "qcompile.json").read_text())
    assert meta["recipe"]["options"] == {"act_order": True, "damping": 0.02}
    loaded = qc.load(tmp_path / "m")
    assert loaded.recipe == qm.recipe and hash(loaded.recipe) == hash(qm.recipe)


# ------------------------------------------------------------------------------------------ backend state


def test_backend_state_is_freed_with_the_compiled_model():
    """Observers (sampled rows, x^T x per layer) live as long as the compiled model, not the process."""
    import gc
    import weakref

    from qcompile import backend

    model, calib = _mlp(), _calib(2)
    compiled = torch.compile(model, backend="quant", options={"recipe": "int4_awq", "compiler": "eager"})
    with qc.calibrate(compiled):
        for batch in calib:
            compiled(batch)
    live = [s for s in backend._STATES.values() if s.options is not None and s.options.get("recipe") == "int4_awq"]
    assert len(live) == 1 and len(live[0].observers) == 2  # shared with graphs compiled later (new shapes)
    state = weakref.ref(live[0])
    del live
    torch._dynamo.reset()  # graphs compiled after a reset still find the statistics
    with torch.no_grad():
        assert compiled(torch.randn(3, 5, 64)).shape == (3, 5, 64)
    backend._prune_states()
    assert state() is not None
    del compiled
    torch._dynamo.reset()
    gc.collect()
    backend._prune_states()
    assert state() is None

"""Scheme mixed16: int8, with int16 activations in the layers that need them, chosen by measuring; integer-only."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.errors import ConversionFailed
from ptqflow.tasks.core.parameters import CalibrationMethod, ConversionParameters, QuantizationScheme, TensorType
from ptqflow.tasks.evaluation.interpreter import RowFailure, audit_tensor_types, predict_tflite
from ptqflow.tasks.evaluation.mixed import quantization

MIXED = ConversionParameters(scheme=QuantizationScheme.mixed16)


def _operators(model_bytes: bytes) -> list[tuple[str, list[str], list[str]]]:
    """Each operator with its input and output tensor types, in execution order."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    graph = model.subgraphs[0]
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

    def types(indices) -> list[str]:
        return [type_names[graph.tensors[i].type] for i in indices if i >= 0]

    found = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = op_names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        found.append((name, types(op.inputs), types(op.outputs)))
    return found


@pytest.fixture(scope="module")
def searched(front_end_model, audio_clips):
    clips, _ = audio_clips
    return quantization(front_end_model, lambda: [clips[:256]], MIXED.model_copy(update={"max_int16_fraction": 1.0}))


def test_the_front_end_gets_int16_where_int8_loses_it_and_stays_integer_only(searched, audio_clips):
    quantized, mixed = searched
    assert mixed is not None and mixed.int16_layers, "raising no layer: the search measured no gain"
    assert len(mixed.int16_layers) <= mixed.layers
    assert mixed.reached_sqnr is not None and mixed.int8_sqnr is not None
    # what each raise was chosen for: fewer rows the integer kernels refuse, then a higher SQNR
    assert (mixed.reached_refused, -mixed.reached_sqnr) < (mixed.int8_refused, -mixed.int8_sqnr)
    assert all(layer for layer, _ in mixed.labels) and {op for _, op in mixed.labels} <= {
        "CONV_2D", "MUL", "DIV", "MAXIMUM", "FULLY_CONNECTED", "SOFTMAX"
    }  # fmt: skip
    audit = audit_tensor_types(quantized)
    assert audit.full_integer and not audit.float_ops
    operators = _operators(quantized)
    assert "DEQUANTIZE" not in [name for name, _, _ in operators]
    # int16 and int8 meet at one integer requantize, never a float hop
    boundaries = [(i, o) for name, i, o in operators if name == "QUANTIZE"]
    assert boundaries and all(set(i + o) <= {"INT8", "INT16"} and i != o for i, o in boundaries)
    assert any("INT16" in o for _, _, o in operators)


def test_samples_the_integer_division_refuses_are_rows_not_a_crash(searched, audio_clips):
    quantized, _ = searched
    clips, _ = audio_clips
    failures: list[RowFailure] = []
    outputs = predict_tflite(quantized, clips[:200], num_threads=1, failures=failures)
    refused = np.isnan(outputs).any(axis=1)
    assert len(failures) == refused.sum() and refused.sum() < 200
    assert all("(DIV)" in failure.message for failure in failures)


def test_no_budget_keeps_every_layer_int8(front_end_model, audio_clips):
    clips, _ = audio_clips
    quantized, mixed = quantization(
        front_end_model, lambda: [clips[:128]], MIXED.model_copy(update={"max_int16_fraction": 0.0})
    )
    assert mixed is not None and mixed.int16_layers == () and quantized == mixed.int8_model
    assert not any("INT16" in o for _, _, o in _operators(quantized))


def test_the_search_is_deterministic(front_end_model, audio_clips, searched):
    clips, _ = audio_clips
    again, mixed = quantization(
        front_end_model, lambda: [clips[:256]], MIXED.model_copy(update={"max_int16_fraction": 1.0})
    )
    assert again == searched[0] and mixed is not None and mixed.int16_layers == searched[1].int16_layers


def test_ptqflows_range_methods_choose_the_int8_ranges(front_end_model, audio_clips):
    clips, _ = audio_clips
    budget = {"max_int16_fraction": 0.0}
    minmax = quantization(front_end_model, lambda: [clips[:128]], MIXED.model_copy(update=budget))[0]
    percentile = ConversionParameters(
        scheme=QuantizationScheme.mixed16, calibration_method=CalibrationMethod.percentile, percentile=99.0, **budget
    )
    assert quantization(front_end_model, lambda: [clips[:128]], percentile)[0] != minmax


def test_mixed16_takes_int8_io_only():
    with pytest.raises(ValueError, match="scheme mixed16 writes int8 inputs and outputs: use --input-type int8"):
        ConversionParameters(scheme=QuantizationScheme.mixed16, input_type=TensorType.float32)


def test_an_operator_the_quantizer_cannot_write_in_integer_fails_in_one_line():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), name="x")
    model = keras.Model(
        inputs, keras.layers.Dense(2)(keras.ops.log(keras.layers.Dense(4, activation="relu")(inputs) + 1))
    )
    rows = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    with pytest.raises(ConversionFailed) as error:
        quantization(model, lambda: [rows], MIXED)
    message = str(error.value)
    assert "LOG" in message and "\n" not in message and "--scheme full_integer" in message


def test_without_the_quantizer_installed_mixed16_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "litert_quantizer" else real(name, *a)
    )
    with pytest.raises(ConversionFailed, match=r"pip install 'ptqflow\[mixed\]'"):
        quantization(None, lambda: [], MIXED)  # type: ignore[arg-type]


def test_an_int16_add_whose_scales_are_powers_of_two_still_runs():
    """LiteRT refused every MobileNetV2-style a16w8 model the quantizer wrote: an int16 ADD whose scales round to
    powers of two goes to a kernel that cannot scale an input down, unless told to take any scales."""
    import keras
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils
    from litert_quantizer import Quantizer

    from ptqflow.tasks.evaluation.mixed import general_int16_scales
    from ptqflow.tasks.quantization.converter import convert_float

    keras.utils.set_random_seed(0)
    features = keras.Input((4,))
    residual = keras.layers.Dense(4)(features)
    model = keras.Model(features, keras.layers.Add()([residual, keras.layers.Dense(4)(residual)]))
    float_tflite = convert_float(model)
    rows = np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype(np.float32)
    name = Interpreter(model_content=float_tflite).get_signature_list()["serving_default"]["inputs"][0]
    recipe = [{"regex": ".*", "operation": "*", "algorithm_key": "min_max_uniform_quantize", "op_config": {
        "activation_tensor_config": {"num_bits": 16, "symmetric": True, "granularity": "TENSORWISE", "dtype": "INT"},
        "weight_tensor_config": {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"},
        "compute_precision": "INTEGER", "explicit_dequantize": False}}]  # fmt: skip
    quantizer = Quantizer(bytearray(float_tflite), recipe)
    ranges = dict(quantizer.calibrate({"serving_default": [{name: row[None]} for row in rows]}))
    float_object = flatbuffer_utils.read_model_from_bytearray(bytearray(float_tflite))
    graph = float_object.subgraphs[0]
    add_code = [c.builtinCode for c in float_object.operatorCodes].index(schema.BuiltinOperator.ADD)
    add = next(op for op in graph.operators if op.opcodeIndex == add_code)
    scaled_down = graph.tensors[add.inputs[0]].name.decode()
    for tensor in ranges:  # the add's first input in [-2, 2], every other activation in [-1, 1]: 2^-14 and 2^-15
        bound = 2.0 if tensor == scaled_down else 1.0
        ranges[tensor] = {"min": np.array(-bound, np.float32), "max": np.array(bound, np.float32)}
    as_written = bytes(quantizer.quantize(ranges, enable_progress_report=False).quantized_model)
    with pytest.raises(RuntimeError, match="ADD"):  # if this stops failing, the test no longer tests the fix
        predict_tflite(as_written, rows)

    fixed = general_int16_scales(as_written)
    outputs = predict_tflite(fixed, rows)
    assert np.isfinite(outputs).all() and np.abs(outputs).max() <= 1.0 + 1e-3  # the sum, clipped to its range
    model_object = flatbuffer_utils.read_model_from_bytearray(bytearray(fixed))
    operators = model_object.subgraphs[0].operators
    adds = [op for op in operators if op.builtinOptionsType == schema.BuiltinOptions.AddOptions]
    assert adds and not any(op.builtinOptions.potScaleInt16 for op in adds)

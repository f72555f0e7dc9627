"""TensorFlow Lite Micro's own interpreter and allocator, run on models the tests train: its arena is the smallest
it allocates the model in, its outputs are compared with LiteRT's, and a model it cannot run says why."""

from __future__ import annotations

import numpy as np
import pytest

from ptqflow.tasks.core.parameters import ConversionParameters, ModelTask
from ptqflow.tasks.evaluation.device import device_footprint
from ptqflow.tasks.evaluation.interpreter import predict_tflite
from ptqflow.tasks.evaluation.metrics import accuracy
from ptqflow.tasks.evaluation.tflm import (
    ARENA_STEP,
    TflmCannotRun,
    TflmRows,
    allocates_in,
    generous_arena,
    predict_tflm,
    recorded_arena,
    run_isolated,
    tflm_figures,
    tflm_on_rows,
    tflm_rows,
)
from ptqflow.tasks.quantization.converter import quantize


@pytest.fixture(scope="module")
def int8_digits(trained_digits_model, digits_splits) -> bytes:
    _, splits = digits_splits
    calibration = splits["train"].features[:100]
    return quantize(trained_digits_model, lambda: [calibration], ConversionParameters())


@pytest.fixture(scope="module")
def sign_model() -> bytes:
    """A float model with an operator TFLM has no kernel for (SIGN)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def sign(x):
        return tf.math.sign(x)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([sign.get_concrete_function()], sign)
    return bytes(converter.convert())


@pytest.mark.smoke
def test_the_arena_is_the_smallest_tflm_allocates_the_model_in(int8_digits, tmp_path):
    run = run_isolated(int8_digits, np.zeros((2, 8, 8, 1), np.float32))
    arena = run.arena
    assert arena.head_bytes > 0 and arena.tail_bytes > 0 and arena.total_bytes >= arena.recorded_bytes
    recorded = recorded_arena(int8_digits)  # in this process: the child reports the same allocator figures
    assert (arena.head_bytes, arena.tail_bytes) == (recorded.head_bytes, recorded.tail_bytes)
    model = tmp_path / "model.tflite"
    model.write_bytes(int8_digits)
    assert allocates_in(model, arena.total_bytes) and not allocates_in(model, arena.total_bytes - ARENA_STEP)
    # What TFLM keeps besides the activations is RAM a plan of the activations alone leaves out.
    assert arena.total_bytes > device_footprint(int8_digits).arena_bytes


def test_temporary_memory_of_preparing_operators_is_in_the_arena(tmp_path):
    """A softmax takes memory while TFLM prepares it, which the recording allocator does not count: the declared
    arena is what allocation needs, not what the recorder reports."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(inputs))
    rows = np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype(np.float32)
    quantized = quantize(model, lambda: [rows], ConversionParameters())
    arena = run_isolated(quantized, rows[:2]).arena
    path = tmp_path / "softmax.tflite"
    path.write_bytes(quantized)
    assert allocates_in(path, arena.total_bytes) and not allocates_in(path, arena.total_bytes - ARENA_STEP)
    assert arena.total_bytes >= arena.recorded_bytes


def test_a_kernel_check_that_aborts_tflm_is_a_refusal_and_the_validation_goes_on():
    """TFLM's softmax aborts the process on the logits' scale of a MobileNetV2 with random weights: the child
    process dies, and validation reports why."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    rows = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    quantized = quantize(model, lambda: [rows], ConversionParameters())
    with pytest.raises(TflmCannotRun, match="TFLM stopped with signal SIGABRT while allocating the model"):
        run_isolated(quantized, rows[:2])


def test_tflm_outputs_agree_with_litert_to_a_few_quantization_steps(int8_digits, digits_splits):
    _, splits = digits_splits
    features = splits["test"].features[:64]
    outputs, steps = predict_tflm(int8_digits, features, generous_arena(int8_digits))
    litert = predict_tflite(int8_digits, features)
    assert outputs.shape == litert.shape and steps.shape == (outputs.shape[1],) and (steps > 0).all()
    # The kernels round differently, so the outputs differ by whole quantization steps, and rarely in the top-1.
    in_steps = np.abs(outputs.astype(np.float64) - litert) / steps
    assert np.allclose(in_steps, np.round(in_steps), atol=1e-3)
    assert (outputs.argmax(1) == litert.argmax(1)).mean() >= 0.9


@pytest.mark.smoke
def test_tflm_figures_judge_the_task_on_a_seeded_draw(int8_digits, digits_splits, trained_digits_model):
    _, splits = digits_splits
    test = splits["test"]
    reference = trained_digits_model.predict(test.features.astype(np.float32), verbose=0)
    whole = tflm_figures(int8_digits, test.features, test.labels, reference, ModelTask.classification)
    assert whole.ran and whole.samples == len(test.labels) and whole.subset_seed is None
    assert whole.arena_bytes == run_isolated(int8_digits, test.features[:2]).arena.total_bytes
    assert whole.figures is not None and whole.figures.float_accuracy == pytest.approx(accuracy(reference, test.labels))
    litert = predict_tflite(int8_digits, test.features)
    tflm, steps = predict_tflm(int8_digits, test.features, generous_arena(int8_digits))
    assert whole.identical_to_litert == pytest.approx((tflm == litert).all(axis=1).mean(), abs=1e-6)
    assert whole.max_difference_lsb == pytest.approx((np.abs(tflm.astype(np.float64) - litert) / steps).max(), abs=1e-3)
    assert {"CONV_2D", "FULLY_CONNECTED"} <= set(whole.ops)

    draw = tflm_figures(int8_digits, test.features, test.labels, reference, ModelTask.classification, samples=40)
    again = tflm_figures(int8_digits, test.features, test.labels, reference, ModelTask.classification, samples=40)
    assert draw.samples == 40 and draw.subset_seed is not None and draw == again


def test_tflm_run_range_by_range_gives_the_figures_of_one_run(int8_digits, digits_splits, trained_digits_model):
    """What a sharded validation does: each range runs its rows of the draw, the validate stage joins them."""
    _, splits = digits_splits
    test = splits["test"]
    reference = trained_digits_model.predict(test.features.astype(np.float32), verbose=0)
    one = tflm_figures(int8_digits, test.features, test.labels, reference, ModelTask.classification, samples=70)
    selected, _ = tflm_rows(len(test.labels), 70)
    parts = []
    for start in range(0, len(test.labels), 128):
        mine = selected[(selected >= start) & (selected < start + 128)]
        parts.append(tflm_on_rows(int8_digits, test.features[mine], mine))
    assert [len(part.rows) for part in parts] != [70] and sum(len(part.rows) for part in parts) == 70
    joined = TflmRows.joined(parts)
    sharded = tflm_figures(
        int8_digits, test.features, test.labels, reference, ModelTask.classification, samples=70, ran=joined
    )
    assert sharded.ran and sharded == one


def test_a_model_tflm_cannot_run_names_the_operator(sign_model):
    with pytest.raises(TflmCannotRun, match="SIGN"):
        run_isolated(sign_model, np.zeros((1, 4), np.float32))
    figures = tflm_figures(
        sign_model, np.zeros((3, 4), np.float32), np.zeros((3, 0)), np.zeros((3, 4)), ModelTask.unlabeled
    )
    assert not figures.ran and "SIGN" in (figures.not_run_reason or "") and figures.ops == ("SIGN",)
    features, rows = np.zeros((3, 4), np.float32), np.arange(3)
    parts = [tflm_on_rows(sign_model, features[:2], rows[:2]), tflm_on_rows(sign_model, features[2:], rows[2:])]
    sharded = tflm_figures(
        sign_model, features, np.zeros((3, 0)), np.zeros((3, 4)), ModelTask.unlabeled, ran=TflmRows.joined(parts)
    )
    assert sharded == figures  # the same reason, in the same words, whichever range met it


def test_the_child_process_ignores_the_working_directory(int8_digits, tmp_path, monkeypatch):
    """Run from a checkout of ptqflow (whose top-level ptqflow/ holds no tasks/ of its own), the child still finds the
    installed package."""
    (tmp_path / "ptqflow").mkdir()
    (tmp_path / "ptqflow" / "__init__.py").write_text("raise ImportError('the working directory, not ptqflow')\n")
    monkeypatch.chdir(tmp_path)
    assert run_isolated(int8_digits, np.zeros((1, 8, 8, 1), np.float32)).arena.total_bytes > 0


def test_a_model_whose_activations_dwarf_its_weights_is_measured():
    """Two megabytes of activations against a few hundred bytes of weights: the arena TFLM is first given is sized
    from the model's plan, not from its file."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((256, 256, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(32, 3, padding="same")(inputs))
    rows = np.random.default_rng(0).uniform(0, 1, (2, 256, 256, 3)).astype(np.float32)
    quantized = quantize(model, lambda: [rows], ConversionParameters())
    arena = run_isolated(quantized, rows[:1]).arena
    assert arena.head_bytes >= 256 * 256 * (3 + 32) and len(quantized) < 10_000

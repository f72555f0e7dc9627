from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from ptqflow.storage.tables import InputSlot
from ptqflow.tasks.core.artifacts import FeatureSpec
from ptqflow.tasks.core.errors import InvalidModel
from ptqflow.tasks.core.parameters import TrainingParameters
from ptqflow.tasks.models.training import build_default_cnn, seeded, train_model

pytestmark = pytest.mark.smoke  # also run on the oldest supported TensorFlow (.ci/run)


def test_default_cnn_takes_raw_values_and_scales_them_itself(digits_splits):
    spec, _ = digits_splits
    model = build_default_cnn(spec)
    assert model.input_shape == (None, 8, 8, 1)
    assert model.output_shape == (None, 10)
    scaling = model.layers[1]
    assert type(scaling).__name__ == "Rescaling"
    np.testing.assert_allclose(scaling(np.array([[0.0, 8.0, 16.0]], np.float32)), [[0.0, 0.5, 1.0]])
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 3 and kinds.count("BatchNormalization") == 3
    assert kinds.count("MaxPooling2D") == 2 and kinds.count("Dense") == 2


def test_trained_model_classifies_digits(trained_digits_model, digits_splits):
    _, splits = digits_splits
    test = splits["test"]
    predictions = trained_digits_model.predict(test.features.astype(np.float32), verbose=0).argmax(1)
    assert (predictions == test.labels).mean() > 0.9


def _draw_python_random_meanwhile():
    """A thread drawing from Python's shared random functions all along, as Prefect's background services do
    (jittered intervals) in the process that trains."""
    stop = threading.Event()

    def draw():
        while not stop.is_set():
            random.random()
            time.sleep(0)

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    return stop, thread


def test_same_seed_same_weights_while_other_threads_draw_random_numbers(digits_splits):
    spec, splits = digits_splits
    train = splits["train"].take(np.arange(300))
    validation = splits["validation"]
    initial, trained = [], []
    stop, thread = _draw_python_random_meanwhile()
    try:
        for _ in range(2):
            with seeded(3):
                model = build_default_cnn(spec)
                initial.append(model.get_weights())
                outcome = train_model(model, train, validation, TrainingParameters(epochs=2))
            trained.append(model.get_weights())
    finally:
        stop.set()
        thread.join()
    assert outcome.epochs_run == 2
    for a, b in zip(*initial):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(*trained):
        np.testing.assert_array_equal(a, b)


def test_seeded_leaves_python_random_as_it_was_for_everyone_else():
    from keras.src.random import seed_generator

    shared = seed_generator.python_random
    with seeded(1):
        assert seed_generator.python_random is not shared
    assert seed_generator.python_random is shared


def _spec(shape, n_classes=3):
    from ptqflow.tasks.core.artifacts import FeatureSpec

    return FeatureSpec(
        shape=shape,
        dtype="float32",
        value_range=(0.0, 1.0),
        n_classes=n_classes,
        class_names=tuple(str(i) for i in range(n_classes)),
    )


def test_auto_picks_an_mlp_for_tabular_and_a_cnn_for_images():
    from ptqflow.tasks.models.training import build_model

    features = np.random.default_rng(0).normal(10, 3, (50, 5)).astype(np.float32)
    mlp = build_model(_spec((5,)), "auto", features)
    assert mlp.name == "ptqflow_mlp" and mlp.output_shape == (None, 3)
    standardised = mlp.get_layer("standardise")(features)
    np.testing.assert_allclose(np.asarray(standardised).mean(axis=0), 0, atol=1e-4)
    assert build_model(_spec((6, 6, 3)), "auto", np.zeros((4, 6, 6, 3), np.float32)).name == "ptqflow_cnn"
    # A constant column is not multiplied by 1/sqrt(epsilon): its spread is floored at a hundredth of the widest.
    with_constant = np.concatenate([features, np.full((50, 1), 7.0, np.float32)], axis=1)
    layer = build_model(_spec((6,)), "auto", with_constant).get_layer("standardise")
    one_above = np.asarray(layer(np.array([[*features.mean(axis=0), 8.0]], np.float32)))[0, -1]
    assert one_above == pytest.approx(100 / features.std(axis=0).max(), rel=1e-3)


def test_shapes_that_fit_no_default_model_say_what_to_pass():
    from ptqflow.tasks.core.errors import InvalidModel
    from ptqflow.tasks.models.training import build_model

    with pytest.raises(InvalidModel, match="pass --input-shape"):
        build_model(_spec((8, 8)), "auto", np.zeros((4, 8, 8), np.float32))


USER_MODULE = """
import keras

def small(input_shape, n_classes):
    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax")(x))

def wrong_shape(input_shape, n_classes):
    inputs = keras.Input((2,))
    return keras.Model(inputs, keras.layers.Dense(n_classes)(inputs))

def wrong_outputs(input_shape, n_classes):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, keras.layers.Dense(n_classes + 1)(keras.layers.Flatten()(inputs)))
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, tmp_path / f"{name}.py"


def test_a_user_model_function_is_imported_and_checked(user_module):
    from ptqflow.tasks.core.errors import InvalidModel
    from ptqflow.tasks.models.training import build_model

    name, _ = user_module
    features = np.zeros((4, 6, 6, 3), np.float32)
    assert build_model(_spec((6, 6, 3)), f"{name}:small", features).output_shape == (None, 3)
    with pytest.raises(InvalidModel, match="builds a model for input shape \\[2\\]"):
        build_model(_spec((6, 6, 3)), f"{name}:wrong_shape", features)
    with pytest.raises(InvalidModel, match="4 outputs for 3 classes"):
        build_model(_spec((6, 6, 3)), f"{name}:wrong_outputs", features)
    with pytest.raises(InvalidModel, match="cannot import model function"):
        build_model(_spec((6, 6, 3)), f"{name}:missing", features)


def test_the_user_models_source_is_part_of_the_training_cache_key(user_module):
    from ptqflow.tasks.core.parameters import TrainingParameters
    from ptqflow.tasks.stages.train import train_float_model

    name, path = user_module
    policy = train_float_model.cache_policy
    inputs = {"store_url": "file:///s", "params": TrainingParameters(model=f"{name}:small"), "seed": 0}
    before = policy.compute_key(None, inputs, {})
    path.write_text(USER_MODULE.replace("Flatten()", "GlobalAveragePooling2D()"))
    assert policy.compute_key(None, inputs, {}) != before


def test_a_trained_model_url_is_loaded_in_safe_mode_and_checked(tmp_path, digits_splits):
    import keras

    from ptqflow.storage.keras_models import keras_model_to_bytes
    from ptqflow.tasks.core.errors import InvalidModel
    from ptqflow.tasks.core.parameters import TrainingParameters
    from ptqflow.tasks.models.training import build_default_cnn, load_trained_model, model_url_fingerprint

    spec, _ = digits_splits
    good = tmp_path / "good.keras"
    good.write_bytes(keras_model_to_bytes(build_default_cnn(spec)))
    data, model = load_trained_model(str(good), spec)
    assert data == good.read_bytes() and model.output_shape == (None, 10)
    assert model_url_fingerprint(str(good)) and model_url_fingerprint(None) == ""

    inputs = keras.Input((8, 8, 1))
    unsafe = keras.Model(
        inputs, keras.layers.Dense(10)(keras.layers.Flatten()(keras.layers.Lambda(lambda x: x * 2)(inputs)))
    )
    (tmp_path / "unsafe.keras").write_bytes(keras_model_to_bytes(unsafe))
    with pytest.raises(InvalidModel, match="not a loadable model.*safe mode"):
        load_trained_model(str(tmp_path / "unsafe.keras"), spec)

    other = keras.Input((4,))
    (tmp_path / "other.keras").write_bytes(keras_model_to_bytes(keras.Model(other, keras.layers.Dense(10)(other))))
    with pytest.raises(InvalidModel, match="is a model for input shape \\[4\\]"):
        load_trained_model(str(tmp_path / "other.keras"), spec)
    with pytest.raises(InvalidModel, match="does not exist"):
        load_trained_model(str(tmp_path / "missing.keras"), spec)
    with pytest.raises(ValueError, match="carries credentials"):
        TrainingParameters(model_url="s3://key:secret@bucket/m.keras")


def test_the_models_own_input_normalisation_is_folded_in_front_of_it(tmp_path, digits_splits):
    """A model trained on x/8 - 1 takes raw values behind the normalisation, saved as legacy .h5 or .keras."""
    import keras

    from ptqflow.tasks.core.parameters import TrainingParameters
    from ptqflow.tasks.evaluation.diagnose import layer_names
    from ptqflow.tasks.models.training import load_trained_model

    spec, splits = digits_splits
    raw = splits["test"].features[:64].astype(np.float32)
    inputs = keras.Input(spec.shape)
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(keras.layers.Flatten(name="flat")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="head")(hidden), name="inner")
    model.save(tmp_path / "model.h5")
    url = str(tmp_path / "model.h5")
    data, wrapped = load_trained_model(url, spec, TrainingParameters(model_url=url, input_scale=0.125, input_offset=-1))
    np.testing.assert_allclose(wrapped.predict(raw, verbose=0), model.predict(raw * 0.125 - 1, verbose=0), atol=1e-6)
    assert data.startswith(b"PK")  # stored as .keras, whatever the format brought
    names, nested = layer_names(wrapped)
    assert {"input_normalisation", "inner", "hidden", "head"} <= set(names) and nested == {"inner", wrapped.name}


def test_a_savedmodel_directory_is_packed_loaded_and_normalised(tmp_path, digits_splits, trained_digits_model):
    from ptqflow.storage.keras_models import keras_model_from_bytes, model_file_format
    from ptqflow.tasks.core.parameters import TrainingParameters
    from ptqflow.tasks.models.training import load_trained_model, model_url_fingerprint

    spec, splits = digits_splits
    raw = splits["test"].features[:32].astype(np.float32)
    trained_digits_model.export(str(tmp_path / "saved"))
    data, model = load_trained_model(str(tmp_path / "saved"), spec)
    assert model_file_format(data) == "saved_model"
    expected = trained_digits_model.predict(raw, verbose=0)
    np.testing.assert_allclose(model.predict(raw, verbose=0), expected, atol=1e-5)
    # What the store holds loads again (another stage, another process) to the same model.
    np.testing.assert_allclose(keras_model_from_bytes(data).predict(raw, verbose=0), expected, atol=1e-5)
    assert load_trained_model(str(tmp_path / "saved"), spec)[0] == data  # same directory, same bytes
    before = model_url_fingerprint(str(tmp_path / "saved"))
    (tmp_path / "saved" / "assets" / "note.txt").write_text("changed")
    assert model_url_fingerprint(str(tmp_path / "saved")) != before

    url = str(tmp_path / "saved")
    _, scaled = load_trained_model(url, spec, TrainingParameters(model_url=url, input_scale=2.0, input_offset=1.0))
    np.testing.assert_allclose(
        scaled.predict(raw, verbose=0), trained_digits_model.predict(raw * 2 + 1, verbose=0), atol=1e-5
    )


def test_a_savedmodel_that_cannot_load_is_told_a_fix_for_a_savedmodel(tmp_path, digits_splits, trained_digits_model):
    from ptqflow.tasks.core.errors import InvalidModel
    from ptqflow.tasks.models.training import load_trained_model

    spec, _ = digits_splits
    trained_digits_model.export(str(tmp_path / "saved"), verbose=False)
    for weights in (tmp_path / "saved" / "variables").glob("variables.data-*"):
        weights.unlink()  # its graph checks out; its weights are gone
    with pytest.raises(InvalidModel) as error:
        load_trained_model(str(tmp_path / "saved"), spec)
    message = str(error.value)
    assert "is not a loadable model (" in message and "\n" not in message
    assert "export its serving computation again" in message and "x.keras" not in message


def two_input_spec(*names: str) -> FeatureSpec:
    """Digits-like samples fed to two inputs: an 8x8x1 image (uint8) and three float features."""
    slots = {"image": InputSlot("image", (8, 8, 1), "uint8"), "extra": InputSlot("extra", (3,))}
    return FeatureSpec(
        shape=(67,),
        dtype="float32",
        value_range=(0.0, 16.0),
        n_classes=3,
        class_names=("a", "b", "c"),
        inputs=tuple(slots[name] for name in names),
    )


def test_a_two_input_model_is_fed_in_order_behind_each_inputs_own_normalisation(tmp_path):
    """Inputs named otherwise are fed in the columns' order; each column gets its own scale and offset, and a
    column stored with another shape of the same size is reshaped to what its input takes."""
    import keras

    from ptqflow.tasks.core.parameters import TrainingParameters
    from ptqflow.tasks.models.feeds import predict_keras
    from ptqflow.tasks.models.training import load_trained_model

    rows = keras.Input((3,), name="rows")
    pixels = keras.Input((64,), name="pixels")
    joined = keras.layers.Concatenate()([rows, pixels])
    model = keras.Model([rows, pixels], keras.layers.Dense(3, activation="softmax")(joined))
    model.save(tmp_path / "two.h5")
    spec = two_input_spec("extra", "image")
    rng = np.random.default_rng(0)
    extra, image = rng.random((16, 3)).astype(np.float32), rng.integers(0, 17, (16, 8, 8, 1)).astype(np.float32)
    packed = np.concatenate([extra, image.reshape(16, -1)], axis=1)
    url = str(tmp_path / "two.h5")
    params = TrainingParameters(model_url=url, input_scale="0.5,0.0625", input_offset="1,0")
    data, wrapped = load_trained_model(url, spec, params)
    assert [t.name for t in wrapped.inputs] == ["extra", "image"] and data.startswith(b"PK")
    expected = model.predict([extra * 0.5 + 1, image.reshape(16, 64) * 0.0625], verbose=0)
    np.testing.assert_allclose(predict_keras(wrapped, packed, inputs=spec.inputs), expected, atol=1e-5)


def test_inputs_named_after_the_columns_are_fed_by_name_whatever_their_order(tmp_path):
    import keras

    from ptqflow.storage.keras_models import keras_model_to_bytes
    from ptqflow.tasks.models.feeds import predict_keras
    from ptqflow.tasks.models.training import load_trained_model

    extra_in, image_in = keras.Input((3,), name="extra"), keras.Input((8, 8, 1), name="image")
    joined = keras.layers.Concatenate()([keras.layers.Flatten()(image_in), extra_in])
    model = keras.Model([image_in, extra_in], keras.layers.Dense(3)(joined))
    (tmp_path / "named.keras").write_bytes(keras_model_to_bytes(model))
    spec = two_input_spec("extra", "image")
    rng = np.random.default_rng(1)
    extra, image = rng.random((8, 3)).astype(np.float32), rng.random((8, 8, 8, 1)).astype(np.float32)
    _, loaded = load_trained_model(str(tmp_path / "named.keras"), spec)
    packed = np.concatenate([extra, image.reshape(8, -1)], axis=1)
    expected = model.predict({"image": image, "extra": extra}, verbose=0)
    np.testing.assert_allclose(predict_keras(loaded, packed, inputs=spec.inputs), expected, atol=1e-5)


def test_a_model_whose_inputs_do_not_fit_the_columns_is_refused_naming_them(tmp_path):
    import keras

    from ptqflow.storage.keras_models import keras_model_to_bytes
    from ptqflow.tasks.core.errors import InvalidModel
    from ptqflow.tasks.core.parameters import TrainingParameters
    from ptqflow.tasks.models.training import load_trained_model

    one = keras.Input((67,))
    (tmp_path / "one.keras").write_bytes(keras_model_to_bytes(keras.Model(one, keras.layers.Dense(3)(one))))
    with pytest.raises(InvalidModel, match="with 1 input\\(s\\).*for 2 feature columns \\(image, extra\\)"):
        load_trained_model(str(tmp_path / "one.keras"), two_input_spec("image", "extra"))
    a, b = keras.Input((3,), name="a"), keras.Input((64,), name="b")
    two = keras.Model([a, b], keras.layers.Dense(3)(keras.layers.Concatenate()([a, b])))
    (tmp_path / "two.keras").write_bytes(keras_model_to_bytes(two))
    with pytest.raises(InvalidModel, match="input 'a' takes shape \\[3\\], but column 'image' holds 64 values"):
        load_trained_model(str(tmp_path / "two.keras"), two_input_spec("image", "extra"))
    url = str(tmp_path / "two.keras")
    with pytest.raises(InvalidModel, match="give 3 and 1 values for a model with 2 input"):
        params = TrainingParameters(model_url=url, input_scale="1,2,3")
        load_trained_model(url, two_input_spec("extra", "image"), params)


def test_the_default_model_for_several_inputs_standardises_each_input_and_learns():
    """Each input standardised on its own before they are joined: joined raw, the small-valued input (pixels) would
    share one int8 scale with the large-valued one."""
    from ptqflow.storage.tables import TensorTable
    from ptqflow.tasks.core.parameters import TrainingParameters
    from ptqflow.tasks.data.datasets import load_dataset
    from ptqflow.tasks.evaluation.metrics import accuracy
    from ptqflow.tasks.models.feeds import predict_keras
    from ptqflow.tasks.models.training import build_model, fit_default_model

    digits = load_dataset("digits")
    images = digits.features.astype(np.float32)
    sums = images.sum(axis=(2, 3)) * 10 + 5  # each row's sum of intensities, on a scale of hundreds
    packed = np.concatenate([images.reshape(len(images), -1), sums], axis=1)
    spec = two_input_spec("image").model_copy(
        update={"n_classes": 10, "class_names": tuple("0123456789"), "shape": (72,)}
    )
    spec = spec.model_copy(update={"inputs": (*spec.inputs, InputSlot("extra", (8,)))})
    assert {layer.name for layer in build_model(spec, "auto", packed).layers} >= {
        "image",
        "extra",
        "image_standardise",
        "extra_standardise",
        "joined_inputs",
    }
    train = TensorTable(packed[:1400], digits.labels[:1400])
    validation = TensorTable(packed[1400:], digits.labels[1400:])
    model, outcome = fit_default_model(spec, train, validation, TrainingParameters(epochs=20), seed=0)
    assert [t.name for t in model.inputs] == ["image", "extra"]
    assert accuracy(predict_keras(model, validation.features, inputs=spec.inputs), validation.labels) > 0.9
    with pytest.raises(InvalidModel, match="--model cnn takes one image input"):
        build_model(spec, "cnn", packed)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"model_url": "m.keras", "input_scale": 0.0}, "maps every input to one value"),
        ({"input_scale": 0.5}, "give it with --model-url"),
        ({"model_url": "m.keras", "input_offset": -1.0}, "--input-offset needs --input-scale"),
        ({"model_url": "m.keras", "input_scale": "0.5,x"}, "not numbers separated by commas"),
        ({"model_url": "m.keras", "input_scale": "0.5,0"}, "maps every input to one value"),
        ({"model_url": "m.keras", "input_scale": 1, "input_offset": "1,nan"}, "give finite offsets"),
    ],
)
def test_input_normalisation_that_cannot_be_right_is_refused(given, message):
    from ptqflow.tasks.core.parameters import TrainingParameters

    with pytest.raises(ValueError, match=message):
        TrainingParameters(**given)


def test_a_regression_model_has_one_linear_output_per_target_and_learns_them():
    import keras

    from ptqflow.storage.tables import TensorTable
    from ptqflow.tasks.core.artifacts import FeatureSpec
    from ptqflow.tasks.core.parameters import ModelTask, TrainingParameters
    from ptqflow.tasks.models.training import build_model, seeded, train_model

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (600, 3)).astype(np.float32)
    y = np.stack([x[:, 0] + 2 * x[:, 1], x[:, 2] ** 2], axis=1).astype(np.float32)
    spec = FeatureSpec(
        shape=(3,),
        dtype="float32",
        value_range=(-1, 1),
        n_classes=0,
        class_names=(),
        task=ModelTask.regression,
        n_targets=2,
    )
    with seeded(0):
        model = build_model(spec, "auto", x)
        train, validation = TensorTable(x[:500], y[:500]), TensorTable(x[500:], y[500:])
        outcome = train_model(model, train, validation, TrainingParameters(epochs=40))
    assert model.output_shape == (None, 2) and model.layers[-1].activation is keras.activations.linear
    assert outcome.validation_accuracy is None and outcome.validation_mae < 0.1  # targets spread over about [-3, 3]


def test_models_that_do_not_fit_the_task_are_refused_with_the_reason():
    import keras

    from ptqflow.tasks.core.artifacts import FeatureSpec
    from ptqflow.tasks.core.errors import InvalidModel
    from ptqflow.tasks.core.parameters import ModelTask, TrainingParameters
    from ptqflow.tasks.models.training import check_model_fits, check_trainable

    def spec(task, n_classes=0, n_targets=0):
        return FeatureSpec(
            shape=(4,),
            dtype="float32",
            value_range=(0, 1),
            n_classes=n_classes,
            class_names=(),
            task=task,
            n_targets=n_targets,
        )

    inputs = keras.Input((4,))
    three = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    check_model_fits(three, spec(ModelTask.unlabeled), "it is a model", "fix")  # any width: no labels to match
    check_model_fits(three, spec(ModelTask.classification, n_classes=3), "it is a model", "fix")  # logits too
    with pytest.raises(InvalidModel, match="with 3 outputs for 1 regression targets: fix"):
        check_model_fits(three, spec(ModelTask.regression, n_targets=1), "it is a model", "fix")
    two_heads = keras.Model(inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(2)(inputs)])
    check_model_fits(two_heads, spec(ModelTask.unlabeled), "it is a model", "fix")  # each output against float
    with pytest.raises(InvalidModel, match="with 2 outputs: --task regression compares one output with the labels"):
        check_model_fits(two_heads, spec(ModelTask.regression, n_targets=1), "it is a model", "fix")
    two_inputs = keras.Model([inputs, keras.Input((4,))], keras.layers.Dense(1)(inputs))
    with pytest.raises(InvalidModel, match="with 2 inputs, and the samples feed one: name one feature column"):
        check_model_fits(two_inputs, spec(ModelTask.unlabeled), "it is a model", "fix")
    with pytest.raises(InvalidModel, match="--task unlabeled has no labels to train on: pass .* --model-url"):
        check_trainable(ModelTask.unlabeled, TrainingParameters())
    check_trainable(ModelTask.unlabeled, TrainingParameters(model_url="/m.keras"))

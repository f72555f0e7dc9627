"""The float Keras model the training stage (``tasks.stages.train``) stores: the default CNN or MLP built and
trained, a user's model function, or a user's trained model file loaded and checked against the data."""

from __future__ import annotations

import importlib
import posixpath
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from ptqflow.storage.keras_models import (
    SAVED_MODEL_PROTO,
    UnsafeModelFile,
    UnsupportedModelFile,
    keras_model_to_bytes,
    model_file_format,
    pack_saved_model,
    user_model_from_bytes,
    with_normalisation_record,
)
from ptqflow.storage.limits import check_model_size
from ptqflow.storage.store import StoreError, filesystem_for
from ptqflow.storage.tables import InputSlot, TensorTable, split_inputs
from ptqflow.tasks.core.artifacts import FeatureSpec
from ptqflow.tasks.core.errors import InvalidModel
from ptqflow.tasks.core.parameters import ModelTask, TrainingParameters
from ptqflow.tasks.core.progress import report
from ptqflow.tasks.data.datasets import files_fingerprint

if TYPE_CHECKING:
    import keras

    from ptqflow.tasks.models.streaming import Moments, RowGroups


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within this block, the same seed and data give the same weights (and so a byte-identical .tflite):
    Python, NumPy and TensorFlow are seeded, TensorFlow's kernels are deterministic, and Keras draws the seeds
    of unseeded layers (initializers, dropout) from a generator of its own rather than Python's shared one."""
    import keras
    import tensorflow as tf

    # Layer names come from process-wide counters and end up in the .keras config and the .tflite tensor names;
    # a fresh session makes the second model built in a process byte-identical to the first.
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    # Keras seeds every unseeded initializer and dropout layer from the module-level `random` functions, which
    # are shared by every thread in the process. Prefect's background services (jittered intervals) draw from
    # them too, so whether they drew between set_random_seed and a layer's construction changed the weights.
    # Keras exposes no hook for this source, hence its private module; without it (another Keras) the weights
    # are only as repeatable as before, and tests/tasks/models/test_train.py says so.
    from keras.src.random import seed_generator

    shared = getattr(seed_generator, "python_random", None)
    if shared is None:
        yield
        return
    seed_generator.python_random = random.Random(seed)
    try:
        yield
    finally:
        seed_generator.python_random = shared


def build_default_cnn(spec: FeatureSpec) -> keras.Model:
    """The seed tutorial's CNN, taking the data set's raw values.

    Conv32-BN-MaxPool, Conv64-BN-MaxPool, Conv64-BN, Flatten, Dense64, Dense(n_classes) softmax. Scaling raw values
    to [0, 1] is the first layer, so the exported .tflite takes raw values and a device needs no preprocessing.

    Each block is Conv (no bias) -> BatchNorm -> ReLU: with the activation after the normalisation the converter
    folds BatchNorm into the convolution's weights, so the .tflite has no separate int8 MUL/ADD per block (less
    quantization error, ~25% faster on the digits model than Conv-ReLU-BN, measured by benchmarks/validation.py).
    'same' padding keeps small inputs (digits are 8x8) from shrinking to nothing; dropout (inactive at inference,
    absent from the .tflite) keeps the small default data set from overfitting; BatchNormalization's momentum is
    0.9 so its moving statistics settle within a few epochs of a small data set.
    """
    import keras

    lo, hi = spec.value_range
    inputs = keras.Input(shape=spec.shape, name="raw_input")
    x = keras.layers.Rescaling(scale=1.0 / (hi - lo), offset=-lo / (hi - lo), name="scale_raw_values")(inputs)
    for block, (filters, pool) in enumerate(((32, True), (64, True), (64, False)), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{block}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"batch_norm{block}")(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
        if pool:
            x = keras.layers.MaxPooling2D(name=f"max_pool{block}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(0.3, name="dropout1")(x)
    x = keras.layers.Dense(64, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(0.3, name="dropout2")(x)
    return keras.Model(inputs, output_head(spec, x), name="ptqflow_cnn")


def output_head(spec: FeatureSpec, x: keras.KerasTensor) -> keras.KerasTensor:
    """The last layer for the task: a softmax over the classes, or one linear unit per regression target."""
    import keras

    if spec.task is ModelTask.regression:
        return keras.layers.Dense(spec.n_targets, name="targets")(x)
    return keras.layers.Dense(spec.n_classes, activation="softmax", name="probabilities")(x)


def check_trainable(task: ModelTask, params: TrainingParameters) -> None:
    """Refuse, before anything runs, a run that would have to train a model without labels."""
    if task is ModelTask.unlabeled and not params.model_url:
        raise InvalidModel(
            "--task unlabeled has no labels to train on: pass the trained model to quantize with --model-url"
        )


@dataclass(frozen=True)
class TrainingOutcome:
    epochs_run: int
    best_epoch: int
    validation_accuracy: float | None
    validation_mae: float | None = None


def train_model(
    model: keras.Model,
    train: RowGroups | TensorTable,
    validation: RowGroups | TensorTable,
    params: TrainingParameters,
    *,
    seed: int = 0,
    inputs: tuple[InputSlot, ...] = (),
) -> TrainingOutcome:
    """Pure stage function: fit ``model`` in place with early stopping on validation loss (best weights kept).

    Both splits are streamed group by group (``tasks.models.streaming``): memory stays bounded by a shuffle window
    whatever their size; the batches of an epoch are drawn from ``seed``."""
    import keras

    from ptqflow.tasks.models.streaming import SplitBatches, row_groups

    train_batches = SplitBatches(row_groups(train), params.batch_size, inputs=inputs, seed=seed)
    validation_batches = SplitBatches(row_groups(validation), params.batch_size, inputs=inputs, shuffle=False)
    regression = train_batches[0][1].ndim == 2
    metric = "mae" if regression else "accuracy"

    class _EpochProgress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            report(
                "train_float_model",
                f"epoch {epoch + 1}/{params.epochs} val_{metric} {logs.get(f'val_{metric}', float('nan')):.4f}",
                epoch + 1,
                params.epochs,
            )

    model.compile(
        optimizer=keras.optimizers.Adam(params.learning_rate),
        loss="mse" if regression else "sparse_categorical_crossentropy",
        metrics=[metric],
    )
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=params.early_stopping_patience, restore_best_weights=True
    )
    history = model.fit(
        train_batches,
        validation_data=validation_batches,
        epochs=params.epochs,
        shuffle=False,  # the batches shuffle themselves, by the seed: Keras would reorder them with Python's shared
        verbose=0,  # random module, which other threads (Prefect's) draw from too
        callbacks=[stopper, _EpochProgress()],
    )
    val_loss = history.history["val_loss"]
    best = int(np.argmin(val_loss))
    if len(val_loss) < params.epochs:  # early stopping ended it: the stage is done all the same
        report("train_float_model", f"stopped early after {len(val_loss)} epochs", params.epochs, params.epochs)
    figure = float(history.history[f"val_{metric}"][best])
    return TrainingOutcome(
        epochs_run=len(val_loss),
        best_epoch=best + 1,
        validation_accuracy=None if regression else figure,
        validation_mae=figure if regression else None,
    )


def _standardisation(moments: Moments, name: str) -> keras.layers.Layer:
    """Standardise each feature with the training split's mean and spread; each spread is floored at a hundredth
    of the widest: a constant or nearly constant feature (a border pixel) would otherwise be multiplied by up to
    1/sqrt(epsilon), and one int8 scale cannot hold both."""
    import keras

    spread = np.sqrt(moments.variance)
    spread = np.maximum(spread, 0.01 * spread.max()) if spread.max() > 0 else np.ones_like(spread)
    return keras.layers.Normalization(mean=moments.mean, variance=spread**2, name=name)


def _moments(train: RowGroups | TensorTable | np.ndarray, inputs: tuple[InputSlot, ...]) -> list[Moments]:
    from ptqflow.tasks.models.streaming import Moments, feature_moments, row_groups

    if isinstance(train, np.ndarray):
        return [Moments.of(part) for part in (split_inputs(train, inputs) if inputs else [train])]
    return feature_moments(row_groups(train), inputs)


def build_default_mlp(spec: FeatureSpec, train: RowGroups | TensorTable | np.ndarray) -> keras.Model:
    """For 1-D (tabular) samples: standardisation with the training split's mean and variance as the first layer
    (so the .tflite takes raw values), then Dense64-Dense64-Dense(n_classes) softmax. Several inputs are each
    flattened and standardised on their own, then joined: joined raw, an input of small values (pixels) would
    share one int8 scale with one of large values and keep a few steps of it."""
    import keras

    moments = _moments(train, spec.inputs)
    if spec.inputs:
        inputs: Any = [keras.Input(shape=slot.shape, name=slot.name) for slot in spec.inputs]
        x = keras.layers.Concatenate(name="joined_inputs")(
            [
                _standardisation(part, f"{slot.name}_standardise")(keras.layers.Flatten(name=f"{slot.name}_flat")(raw))
                for slot, raw, part in zip(spec.inputs, inputs, moments)
            ]
        )
    else:
        inputs = keras.Input(shape=spec.shape, name="raw_input")
        x = _standardisation(moments[0], "standardise")(inputs)
    x = keras.layers.Dense(64, activation="relu", name="dense1")(x)
    x = keras.layers.Dense(64, activation="relu", name="dense2")(x)
    return keras.Model(inputs, output_head(spec, x), name="ptqflow_mlp")


def user_model_module(model: str) -> str | None:
    """The module of a ``module:function`` model reference (its source is part of the training cache key)."""
    return model.split(":", 1)[0] if ":" in model else None


def build_model(spec: FeatureSpec, model: str, train: RowGroups | TensorTable | np.ndarray) -> keras.Model:
    """The model named by ``--model`` for samples described by ``spec``; ``train`` (the split, or its features)
    gives the default MLP its standardisation.

    Raises:
        InvalidModel: the architecture does not fit the data, or a user function cannot be used.
    """
    import keras

    rank = len(spec.shape)
    if spec.inputs and model == "cnn":
        raise InvalidModel(
            "--model cnn takes one image input, and the samples feed several: use --model mlp, or module:function"
        )
    if model == "auto":
        model = "cnn" if rank == 3 else "mlp" if rank == 1 else ""
        if not model:
            raise InvalidModel(
                f"samples of shape {list(spec.shape)} fit neither default model (cnn takes HxWxC, mlp takes 1-D): "
                "pass --input-shape (e.g. H,W,1) or --model module:function"
            )
    if model == "cnn":
        if rank != 3:
            raise InvalidModel(f"--model cnn needs HxWxC samples, not shape {list(spec.shape)}: pass --input-shape")
        return build_default_cnn(spec)
    if model == "mlp":
        return build_default_mlp(spec, train)
    module_name, function_name = model.split(":", 1)
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise InvalidModel(
            f"cannot import model function {model!r} ({error}): put {module_name} on PYTHONPATH or fix the name"
        ) from None
    # Several inputs: each one's shape by its name (the model's inputs are matched to the columns by name).
    shape = {slot.name: slot.shape for slot in spec.inputs} if spec.inputs else tuple(spec.shape)
    built = function(shape, spec.n_targets if spec.task is ModelTask.regression else spec.n_classes)
    if not isinstance(built, keras.Model):
        raise InvalidModel(f"{model} returned {type(built).__name__}, not a keras.Model")
    what, fix = f"{model} builds a model", "build the model from its arguments"
    if spec.inputs:
        built = with_named_inputs(built, spec.inputs, None, what, fix)
    return check_model_fits(built, spec, what, fix)


def check_model_fits(model: keras.Model, spec: FeatureSpec, what: str, fix: str) -> keras.Model:
    """Raise InvalidModel unless ``model`` takes the samples' shape and has one output (of one value per class,
    or per regression target; any width for unlabeled data)."""
    if spec.inputs:
        given = [(str(t.name), tuple(t.shape[1:])) for t in model.inputs]
        if given != [(slot.name, slot.shape) for slot in spec.inputs]:
            raise InvalidModel(f"{what} whose inputs {given} are not the feature columns' {list(spec.inputs)}: {fix}")
    elif len(model.inputs) != 1:
        raise InvalidModel(
            f"{what} with {len(model.inputs)} inputs, and the samples feed one: name one feature column per input, "
            "--feature-column a,b"
        )
    elif tuple(model.input_shape[1:]) != tuple(spec.shape):
        raise InvalidModel(
            f"{what} for input shape {list(model.input_shape[1:])}, "
            f"but the samples have shape {list(spec.shape)}: {fix}"
        )
    if len(model.outputs) != 1:
        if spec.task is ModelTask.unlabeled:
            return model  # each output is compared with the float model's own
        raise InvalidModel(
            f"{what} with {len(model.outputs)} outputs: --task {spec.task.value} compares one output with the labels; "
            "validate a model with several outputs against its float self with --task unlabeled"
        )
    width = model.output_shape[-1]
    if spec.task is ModelTask.regression and width != spec.n_targets:
        raise InvalidModel(f"{what} with {width} outputs for {spec.n_targets} regression targets: {fix}")
    if spec.task is ModelTask.classification and width != spec.n_classes:
        raise InvalidModel(f"{what} with {width} outputs for {spec.n_classes} classes: {fix}")
    return model


def _model_files(url: str) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """The model's file, or every file of a SavedModel directory."""
    try:
        fs, path = filesystem_for(url)
    except StoreError as error:
        raise InvalidModel(f"cannot open --model-url: {error}") from None
    root = path.rstrip("/")
    if fs.isdir(root) and fs.isfile(f"{root}/{SAVED_MODEL_PROTO}"):
        return fs, root, sorted(fs.find(root))
    if not fs.isfile(path):
        raise InvalidModel(
            f"--model-url {url} does not exist: pass the URL of a .keras or .h5 file, or of a SavedModel directory"
        )
    return fs, path, [path]


def model_url_fingerprint(url: str | None) -> str:
    """What the model files hold now (sizes and versions, no read): part of the training stage's cache key."""
    if not url:
        return ""
    fs, _, files = _model_files(url)
    return files_fingerprint(fs, files)


def _read_model(url: str) -> bytes:
    """The model file's bytes, or a SavedModel directory packed as one zip; its size checked before reading."""
    fs, root, files = _model_files(url)
    check_model_size(url, sum(fs.size(path) for path in files))
    if files == [root]:
        return fs.cat_file(root)
    return pack_saved_model((posixpath.relpath(path, root), fs.cat_file(path)) for path in files)


def with_input_normalisation(model: keras.Model, scale: float, offset: float) -> keras.Model:
    """``model`` behind a Rescaling layer from raw values to what it was trained on (``raw * scale + offset``):
    the converted model takes raw values, and the converter folds the rescaling into the first layer's weights
    where it can (see docs/data-and-models.md for why here rather than in the input's quantization)."""
    import keras

    raw = keras.Input(model.input_shape[1:], name="raw_input")
    normalised = keras.layers.Rescaling(scale, offset, name="input_normalisation")(raw)
    return keras.Model(raw, model(normalised), name=f"{model.name}_on_raw_input")


def _input_targets(model: keras.Model, inputs: tuple[InputSlot, ...], what: str, fix: str) -> list[int]:
    """Which of the model's inputs each feature column feeds: by name when the model's inputs are named after the
    columns, else in order; each column holds as many values as its input takes.

    Raises:
        InvalidModel: another number of inputs, or a column that does not fit its input.
    """
    names = [str(t.name) for t in model.inputs]
    columns = [slot.name for slot in inputs]
    if len(names) != len(columns):
        raise InvalidModel(
            f"{what} with {len(names)} input(s) ({', '.join(names)}) for {len(columns)} feature columns "
            f"({', '.join(columns)}): give one --feature-column per input"
        )
    targets = [names.index(c) for c in columns] if sorted(names) == sorted(columns) else list(range(len(columns)))
    for slot, target in zip(inputs, targets):
        wanted = tuple(int(d) for d in model.inputs[target].shape[1:] if d is not None)
        if len(wanted) != len(model.inputs[target].shape[1:]) or int(np.prod(wanted)) != slot.size:
            raise InvalidModel(
                f"{what} whose input {names[target]!r} takes shape {list(model.inputs[target].shape[1:])}, but column "
                f"{slot.name!r} holds {slot.size} values of shape {list(slot.shape)} per row: {fix}"
            )
    return targets


def with_named_inputs(
    model: keras.Model,
    inputs: tuple[InputSlot, ...],
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None,
    what: str,
    fix: str,
) -> keras.Model:
    """``model`` behind one input per feature column, named after it and in the columns' order (so the .tflite's
    inputs are named after the columns too), each with its own normalisation (``raw * scale + offset``) and
    reshaped to what its model input takes.

    Raises:
        InvalidModel: the model's inputs do not fit the columns.
    """
    import keras

    targets = _input_targets(model, inputs, what, fix)
    shapes = [tuple(int(d) for d in t.shape[1:]) for t in model.inputs]
    as_is = normalisation is None and all(
        target == i and str(model.inputs[i].name) == slot.name and shapes[i] == slot.shape
        for i, (slot, target) in enumerate(zip(inputs, targets))
    )
    if as_is:
        return model
    raws = [keras.Input(slot.shape, name=slot.name) for slot in inputs]
    fed: list[Any] = [None] * len(inputs)
    for i, (slot, raw, target) in enumerate(zip(inputs, raws, targets)):
        x = raw
        if normalisation is not None:
            scale, offset = normalisation[0][i], normalisation[1][i]
            x = keras.layers.Rescaling(scale, offset, name=f"{slot.name}_normalisation")(x)
        if shapes[target] != slot.shape:
            x = keras.layers.Reshape(shapes[target], name=f"{slot.name}_reshape")(x)
        fed[target] = x
    return keras.Model(raws, model(fed), name=f"{model.name}_on_named_inputs")


def _reload_fix(data: bytes) -> str:
    """What would make a model file that failed to load loadable, for its own format."""
    try:
        kind = model_file_format(data)
    except UnsupportedModelFile:
        kind = "keras"
    if kind == "saved_model":
        return (
            "export its serving computation again, with TensorFlow (tf.saved_model.save(obj, path, "
            "signatures=...)) or Keras (model.export(path))"
        )
    return "save it with model.save('x.keras'); Lambda layers and custom objects are refused (Keras safe mode)"


def load_trained_model(
    url: str, spec: FeatureSpec, params: TrainingParameters | None = None
) -> tuple[bytes, keras.Model]:
    """Read and load a trained model: ``.keras`` or legacy ``.h5`` with Keras safe mode on (no Lambda layers or
    arbitrary code), or a SavedModel directory (packed, its ops checked: ``storage.keras_models``); with
    ``input_scale``, behind its input normalisation. Returns the bytes to store (the file itself when it is a
    ``.keras`` used as it is, ``.keras`` bytes for an ``.h5`` or a normalised model, the packed SavedModel) and the
    model.

    Raises:
        InvalidModel: missing, unloadable, unsafe, or not fitting the data.
    """
    params = params or TrainingParameters(model_url=url)
    what, fix = f"--model-url {url} is a model", "export a model for this data"
    try:
        normalisation = params.normalisation(max(1, len(spec.inputs)))
    except ValueError as error:
        raise InvalidModel(str(error)) from None
    data = _read_model(url)
    try:
        if normalisation is not None and model_file_format(data) == "saved_model":
            data = with_normalisation_record(data, normalisation[0][0], normalisation[1][0])
        model, kind = user_model_from_bytes(data)
    except UnsupportedModelFile as error:
        raise InvalidModel(f"--model-url {url} is {error}: save the model with model.save('x.keras')") from None
    except UnsafeModelFile as error:
        raise InvalidModel(f"--model-url {url} is refused: {error}") from None
    except Exception as error:  # zip, h5, config and safe-mode errors all mean "cannot use this file"
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise InvalidModel(f"--model-url {url} is not a loadable model ({detail}): {_reload_fix(data)}") from None
    given = model
    if spec.inputs:
        model = with_named_inputs(model, spec.inputs, normalisation, what, fix)
    elif normalisation is not None and kind != "saved_model":  # a SavedModel carries its normalisation in its zip
        model = with_input_normalisation(model, normalisation[0][0], normalisation[1][0])
    model = check_model_fits(model, spec, what, fix)
    converted = kind == "h5" or (kind == "keras" and model is not given)
    return (keras_model_to_bytes(model) if converted else data), model


def fit_default_model(
    spec: FeatureSpec,
    train: RowGroups | TensorTable,
    validation: RowGroups | TensorTable,
    params: TrainingParameters,
    seed: int,
) -> tuple[keras.Model, TrainingOutcome]:
    """Pure stage function: seed everything, build the model ``params.model`` names for ``spec``, train it (both
    splits streamed: in memory, or group by group from the store)."""
    with seeded(seed):
        model = build_model(spec, params.model, train)
        outcome = train_model(model, train, validation, params, seed=seed, inputs=spec.inputs)
    return model, outcome

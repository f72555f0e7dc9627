from __future__ import annotations

import time

import numpy as np
import pytest

from ptqflow.storage.keras_models import (
    UnsafeModelFile,
    UnsupportedModelFile,
    keras_model_from_bytes,
    keras_model_to_bytes,
    pack_saved_model,
    user_model_from_bytes,
)

pytestmark = pytest.mark.smoke  # also run on the oldest supported TensorFlow (.ci/run)


def _model():
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3)(inputs))


def test_same_weights_give_the_same_bytes_at_any_time():
    model = _model()
    first = keras_model_to_bytes(model)
    time.sleep(1.1)  # the .keras archive records its save time; the store must not see it
    assert keras_model_to_bytes(model) == first


def test_round_trip_predicts_the_same():
    model = _model()
    loaded = keras_model_from_bytes(keras_model_to_bytes(model))
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def _with_config(data: bytes, change) -> bytes:
    """The same .keras archive with its config.json changed by ``change`` (what an attacker can edit)."""
    import io
    import json
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            payload = src.read(info.filename)
            if info.filename == "config.json":
                config = json.loads(payload)
                change(config)
                payload = json.dumps(config).encode()
            dst.writestr(info.filename, payload)
    return out.getvalue()


def test_a_lambda_layer_is_refused(tmp_path):
    import keras
    import pytest

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="(?i)lambda|safe_mode"):
        keras_model_from_bytes((tmp_path / "lambda.keras").read_bytes())


def test_a_layer_naming_a_module_outside_keras_is_refused_without_importing_it(tmp_path, monkeypatch):
    import pytest

    marker = tmp_path / "pwned"
    (tmp_path / "ptqflow_model_probe.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Dense: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def custom_object(config):
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Dense":
                layer["module"], layer["registered_name"] = "ptqflow_model_probe", "ptqflow_model_probe>Dense"

    with pytest.raises(Exception) as refused:
        keras_model_from_bytes(_with_config(keras_model_to_bytes(_model()), custom_object))
    assert not marker.exists(), f"the planted module was imported ({refused.value})"


def test_a_legacy_h5_model_loads_and_predicts_the_same(tmp_path):
    model = _model()
    model.save(tmp_path / "model.h5")
    loaded, kind = user_model_from_bytes((tmp_path / "model.h5").read_bytes())
    assert kind == "h5"
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    assert user_model_from_bytes(keras_model_to_bytes(model))[1] == "keras"


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_lambda_layer_is_refused_in_each_format(tmp_path, suffix):
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(tmp_path / f"lambda{suffix}")
    with pytest.raises(ValueError, match="(?i)lambda|safe_mode"):
        user_model_from_bytes((tmp_path / f"lambda{suffix}").read_bytes())


@pytest.mark.parametrize("data", [b"not a model at all", b"PK\x05\x06" + b"\x00" * 18])
def test_bytes_in_neither_format_are_refused_by_their_content(data):
    with pytest.raises(UnsupportedModelFile, match="neither a .keras archive nor a legacy HDF5"):
        user_model_from_bytes(data)


def _packed(directory) -> bytes:
    return pack_saved_model(
        (path.relative_to(directory).as_posix(), path.read_bytes()) for path in directory.rglob("*") if path.is_file()
    )


def test_a_packed_savedmodel_loads_as_a_model_that_predicts_the_same(tmp_path):
    model = _model()
    model.export(str(tmp_path / "saved"))
    loaded, kind = user_model_from_bytes(_packed(tmp_path / "saved"))
    assert kind == "saved_model" and loaded.input_shape == (None, 4)
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5)


def test_a_savedmodel_saved_with_its_optimizers_slots_loads_and_serves(tmp_path):
    """A TF 1 optimizer (as a Keras 2 one) saved beside the model: TensorFlow cannot revive it, and loading its slot
    variables used to fail with "'_UserObject' object has no attribute 'add_slot'"."""
    import tensorflow as tf

    class Trained(tf.Module):
        def __init__(self):
            self.kernel = tf.Variable(tf.ones((4, 3)))
            self.optimizer = tf.compat.v1.train.AdamOptimizer(0.1)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def serve(self, x):
            return {"output_0": tf.matmul(x, self.kernel)}

    trained = Trained()
    trained.optimizer.apply_gradients([(tf.ones((4, 3)), trained.kernel)])  # one step: Adam's two slots exist
    tf.saved_model.save(trained, str(tmp_path / "saved"), signatures={"serving_default": trained.serve})
    with pytest.raises(AttributeError, match="add_slot"):  # what TensorFlow alone does with it
        tf.saved_model.load(str(tmp_path / "saved"))
    loaded, kind = user_model_from_bytes(_packed(tmp_path / "saved"))
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    assert kind == "saved_model"
    np.testing.assert_allclose(loaded.predict(x, verbose=0), x @ trained.kernel.numpy(), rtol=1e-5)  # trained


def test_a_savedmodel_whose_serving_signature_writes_files_is_refused_before_it_runs(tmp_path):
    import tensorflow as tf

    target = tmp_path / "written.txt"

    class Writer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def serve(self, x):
            tf.io.write_file(str(target), "from the model")
            return {"output_0": x * 2.0}

    writer = Writer()
    tf.saved_model.save(writer, str(tmp_path / "writer"), signatures={"serving_default": writer.serve})
    with pytest.raises(UnsafeModelFile, match="would run WriteFile"):
        user_model_from_bytes(_packed(tmp_path / "writer"))
    assert not target.exists()


def test_an_attribute_shadowing_the_serving_signature_is_refused_before_it_runs(tmp_path):
    """Keras's TFSMLayer calls ``getattr(root, "serving_default")`` before the signature of that name: a clean
    signature beside a writing attribute must not pass."""
    import tensorflow as tf

    target = tmp_path / "written.txt"

    class Shadowing(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def clean(self, x):
            return {"output_0": x * 2.0}

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def writing(self, x):
            tf.io.write_file(str(target), "from the model")
            return {"output_0": x * 2.0}

    module = Shadowing()
    module.serving_default = module.writing
    tf.saved_model.save(module, str(tmp_path / "shadowing"), signatures={"serving_default": module.clean})
    with pytest.raises(UnsafeModelFile, match="attribute named like its signature 'serving_default'"):
        user_model_from_bytes(_packed(tmp_path / "shadowing"))
    assert not target.exists()


def test_a_function_outside_the_signature_that_reads_a_file_is_refused(tmp_path):
    """Every concrete function the loaded object holds can be called once it is loaded: an outside read that no
    blocklist named (GenerateVocabRemapping opens the file it is given) is refused because it is not compute."""
    import tensorflow as tf

    vocabulary = tmp_path / "outside.txt"
    vocabulary.write_text("a\nb\n")

    class Reading(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def serve(self, x):
            return {"output_0": x * 2.0}

        @tf.function(input_signature=[])
        def read(self):
            remapping, _ = tf.raw_ops.GenerateVocabRemapping(
                new_vocab_file=str(vocabulary), old_vocab_file=str(vocabulary), new_vocab_offset=0, num_new_vocab=2
            )
            return remapping

    module = Reading()
    tf.saved_model.save(module, str(tmp_path / "reading"), signatures={"serving_default": module.serve})
    with pytest.raises(UnsafeModelFile, match="would run GenerateVocabRemapping"):
        user_model_from_bytes(_packed(tmp_path / "reading"))


def test_a_keras_archive_that_inflates_past_the_model_limit_is_refused_before_loading(monkeypatch):
    data = keras_model_to_bytes(_model())
    monkeypatch.setenv("PTQFLOW_MAX_MODEL_BYTES", str(len(data) + 10))  # the file passes; its members do not
    with pytest.raises(UnsafeModelFile, match="the .keras archive unpacks to [0-9,]+ bytes.*PTQFLOW_MAX_MODEL_BYTES"):
        user_model_from_bytes(data)


def test_a_packed_savedmodel_naming_a_path_outside_itself_is_refused(tmp_path):
    model = _model()
    model.export(str(tmp_path / "saved"))
    import io
    import zipfile

    out = io.BytesIO(_packed(tmp_path / "saved"))
    with zipfile.ZipFile(out, "a") as archive:
        archive.writestr("../escaped.txt", b"x")
    with pytest.raises(UnsafeModelFile, match="outside itself"):
        user_model_from_bytes(out.getvalue())
    assert not (tmp_path / "escaped.txt").exists()


def test_a_packed_savedmodel_that_unpacks_past_the_model_limit_is_refused_naming_the_setting(tmp_path, monkeypatch):
    model = _model()
    model.export(str(tmp_path / "saved"))
    packed = _packed(tmp_path / "saved")
    monkeypatch.setenv("PTQFLOW_MAX_MODEL_BYTES", "1000")  # the file limit, raised or lowered, holds unpacked too
    with pytest.raises(UnsafeModelFile, match="unpacks to [0-9,]+ bytes, above the limit of 1,000 .*PTQFLOW_MAX_MODEL"):
        user_model_from_bytes(packed)
    monkeypatch.setenv("PTQFLOW_MAX_MODEL_BYTES", str(10 << 30))
    assert user_model_from_bytes(packed)[1] == "saved_model"

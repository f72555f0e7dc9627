from __future__ import annotations

import time

import numpy as np
import pytest

from ptqflow.storage.keras_models import keras_model_from_bytes, keras_model_to_bytes

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

"""Shared fixtures: one Prefect test server per session, a small trained digits model, S3 on a local moto server."""

from __future__ import annotations

import os

# Before TensorFlow or Prefect are imported anywhere.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def ptqflow_executable() -> str:
    return shutil.which("ptqflow") or os.path.join(os.path.dirname(sys.executable), "ptqflow")


@pytest.fixture(scope="session")
def cli(prefect_server):
    """Run ``ptqflow`` as a user would (a subprocess) against the session's Prefect server."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [ptqflow_executable(), *args],
            env={**os.environ, "PREFECT_API_URL": prefect_server, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def start_cli(prefect_server: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``ptqflow`` in the background with Prefect's logs on stderr (line by line)."""
    return subprocess.Popen(
        [ptqflow_executable(), *args],
        env={**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def prefect_executable() -> str:
    return shutil.which("prefect") or os.path.join(os.path.dirname(sys.executable), "prefect")


# Each session server's PREFECT_HOME, by API URL: its database is what the server recorded (tests grep it).
PREFECT_HOMES: dict[str, Path] = {}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real ``prefect server start`` for the whole session, on 127.0.0.1 with a free port and its own
    PREFECT_HOME (database included); its UI talks to it. Yields the API URL, which this process uses too."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_UI_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # Schedules are turned into runs by the scheduler service: every 2 s here instead of every 60 s.
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
    )
    log = open(home / "server.log", "wb")  # noqa: SIM115 - kept open for the server's lifetime
    server = subprocess.Popen(
        [prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_until_healthy(server, f"{url}/health", home / "server.log", "prefect server")
    PREFECT_HOMES[url] = home
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)  # send this process's last logs while the server is still up
    finally:
        stop_process_group(server, signal.SIGTERM)
        log.close()


def wait_until_healthy(server: subprocess.Popen, health_url: str, log: Path, what: str, seconds: float = 180) -> None:
    """Wait until ``health_url`` answers 200; if ``server`` exits or the time runs out, kill it and raise with the
    end of its ``log``."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"{what} did not start: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process_group(process: subprocess.Popen, first: signal.Signals) -> None:
    """Stop a process started with ``start_new_session=True`` and its children: ``first``, then SIGKILL after
    30 s."""
    os.killpg(process.pid, first)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# The seed of the trained fixtures: PTQFLOW_TEST_SEED=7 reruns the suite on differently trained weights, to show
# that no test depends on the floating point of one training run (or of one processor).
TEST_SEED = int(os.environ.get("PTQFLOW_TEST_SEED", "0"))


@pytest.fixture(scope="session")
def digits_splits():
    from ptqflow.tasks.core.parameters import SamplingParameters
    from ptqflow.tasks.data.datasets import load_dataset
    from ptqflow.tasks.data.sampling import feature_spec, split_dataset

    table = load_dataset("digits")
    return feature_spec(table), split_dataset(table, SamplingParameters(), seed=TEST_SEED)


@pytest.fixture(scope="session")
def trained_digits_model(digits_splits):
    """The default CNN trained briefly on digits (pure stage functions, no Prefect)."""
    from ptqflow.tasks.core.parameters import TrainingParameters
    from ptqflow.tasks.models.training import fit_default_model

    spec, splits = digits_splits
    model, _ = fit_default_model(
        spec, splits["train"], splits["validation"], TrainingParameters(epochs=8), seed=TEST_SEED
    )
    return model


CLIP_SAMPLES, FRAME = 256, 32  # an audio clip of 8 frames


@pytest.fixture(scope="session")
def audio_clips():
    """Three tones at random phase and level, with noise; every tenth clip silent."""
    import numpy as np

    rng = np.random.default_rng(TEST_SEED)
    labels = rng.integers(0, 3, 600)
    t = np.arange(CLIP_SAMPLES)
    frequency = np.array([0.05, 0.15, 0.3])[labels] * (1 + 0.1 * rng.normal(size=600))
    level = rng.uniform(0.01, 1.0, size=600)
    clips = np.sin(2 * np.pi * frequency[:, None] * t + rng.uniform(0, 6, size=(600, 1))) * level[:, None]
    clips = (clips + 0.01 * rng.normal(size=clips.shape)).astype(np.float32)
    clips[::10] = 0.0
    return clips, labels.astype(np.int64)


@pytest.fixture(scope="session")
def front_end_model(audio_clips):
    """An audio front end (framing, a learned filterbank, its power, a division by each channel's maximum over
    the clip: 0 on a silent clip, which float divides by a tiny floor and int8 cannot) and a classifier: int8
    loses the front end's dynamic range."""
    import keras

    keras.utils.set_random_seed(TEST_SEED)
    audio = keras.Input((CLIP_SAMPLES,), name="audio")
    frames = keras.layers.Reshape((CLIP_SAMPLES // FRAME, FRAME, 1))(audio)
    bank = keras.layers.Conv2D(12, (1, FRAME), name="filterbank")(frames)
    power = keras.layers.Multiply(name="power")([bank, bank])
    peak = keras.layers.MaxPooling2D((CLIP_SAMPLES // FRAME, 1), name="clip_max")(power)
    normalized = keras.ops.divide(power, keras.ops.maximum(peak, 1e-6))
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(keras.layers.Flatten()(normalized))
    model = keras.Model(audio, keras.layers.Dense(3, activation="softmax", name="classes")(hidden))
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    clips, labels = audio_clips
    model.fit(clips, labels, epochs=30, batch_size=64, verbose=0)
    return model


OUTLIER_VALUE = 1.0e5  # far above any trained activation of ``dense`` (single digits on digits)


def write_outlier_model(model, path, value: float = OUTLIER_VALUE) -> None:
    """Save a copy of ``model`` in which exactly one layer, ``dense``, quantizes badly, whatever the trained
    weights: its hidden unit 0 becomes the constant OUTLIER_VALUE (zero input weights, that bias) and the head
    ignores it (zero outgoing weights). The float function is the trained model's without unit 0; int8 collapses,
    since ``dense``'s output range is taken by the constant and its other units round to zero. The head's weights
    keep their per-channel ranges (a zero row quantizes exactly), so no other layer is hurt: the per-layer
    debugger must rank ``dense`` first by a wide margin on any processor."""
    from ptqflow.storage.keras_models import keras_model_from_bytes, keras_model_to_bytes

    copy = keras_model_from_bytes(keras_model_to_bytes(model))
    dense, head = copy.get_layer("dense"), copy.get_layer("probabilities")
    kernel, bias = dense.get_weights()
    kernel[:, 0] = 0.0
    bias[0] = value
    dense.set_weights([kernel, bias])
    head_kernel, head_bias = head.get_weights()
    head_kernel[0, :] = 0.0
    head.set_weights([head_kernel, head_bias])
    path.write_bytes(keras_model_to_bytes(copy))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """S3 served by moto on 127.0.0.1 at a random port, reached through s3fs like a real bucket."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_image_folder(
    root, per_class: int = 12, size=(16, 16), mode: str = "RGB", suffix: str = ".png", seed: int = 0
) -> None:
    """``root/<class>/<n><suffix>``: three classes, a bright square in a class-specific corner, on noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(["circle", "square", "triangle"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (*size, 3)).astype(np.uint8)
            y, x = [(0, 0), (0, size[1] // 2), (size[0] // 2, 0)][label]
            pixels[y : y + size[0] // 2, x : x + size[1] // 2] = 230
            image = Image.fromarray(pixels).convert(mode)
            image.save(root / name / f"{i:03d}{suffix}")


def write_huggingface_images(
    path, rows: int = 90, sizes=((12, 12),), corrupt_row: int | None = None, seed: int = 0, split: list | None = None
):
    """A Parquet file in the layout Hugging Face ``datasets`` writes for an ``Image`` column and a ``ClassLabel``
    label: a struct of (bytes, path), and the class names in the ``huggingface`` schema metadata."""
    import io
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    encoded = []
    for i, label in enumerate(labels):
        height, width = sizes[i % len(sizes)]
        noise = rng.integers(-12, 12, (height, width, 3))
        pixels = np.clip(40 + 80 * int(label) + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        encoded.append(b"broken" if i == corrupt_row else buffer.getvalue())
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(encoded)], type=image_type)
    features = {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog", "fox", "owl"], "_type": "ClassLabel"}}
    fields, columns = [("image", image_type), ("label", pa.int64())], [images, pa.array(labels)]
    if split is not None:  # a "split" column: each row's split name
        fields.append(("split", pa.string()))
        columns.append(pa.array(split, pa.string()))
    schema = pa.schema(fields).with_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    pq.write_table(pa.table(columns, schema=schema), str(path), row_group_size=32)
    return labels


def ptqflow_events(client, since) -> list:
    """Every ``ptqflow.*`` event the Prefect server received since ``since``, oldest first."""
    from datetime import datetime, timedelta, timezone

    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    until = datetime.now(timezone.utc) + timedelta(minutes=1)
    named = EventNameFilter(prefix=["ptqflow."])
    window = EventOccurredFilter(since=since, until=until)
    page = client.read_events(filter=EventFilter(event=named, occurred=window), limit=50)  # the server's largest page
    events = list(page.events)
    while page.next_page:
        page = client.read_events_page(page.next_page)
        events += page.events
    return sorted(events, key=lambda e: e.occurred)


def wait_for(find, count: int = 1, seconds: float = 60) -> list:
    """Call ``find`` until it returns at least ``count`` items (events reach the server asynchronously)."""
    deadline = time.monotonic() + seconds
    while len(found := list(find())) < count and time.monotonic() < deadline:
        time.sleep(1)
    return found

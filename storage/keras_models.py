"""Keras models as bytes: the one place that knows how a ``.keras`` archive is written and read, and which model
files a user may bring: ``.keras`` and legacy HDF5 ``.h5`` (each loaded with Keras safe mode on), and SavedModel
directories (packed as one zip; loaded only when the graph its serving signature runs has no op that reaches
outside the model, such as file reads and writes)."""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tempfile
import weakref
import zipfile
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

_EPOCH = (1980, 1, 1, 0, 0, 0)


def _normalised_archive(data: bytes) -> bytes:
    """Rewrite a ``.keras`` zip without its save time, so the same weights always give the same bytes
    (and so one content-addressed blob, whatever the clock said)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in sorted(src.infolist(), key=lambda i: i.filename):
            payload = src.read(info.filename)
            if info.filename == "metadata.json":
                meta = json.loads(payload)
                meta.pop("date_saved", None)
                payload = json.dumps(meta, sort_keys=True).encode()
            elif info.filename == "config.json":
                payload = json.dumps(_renumber_shared_objects(json.loads(payload))).encode()
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=_EPOCH), payload, zipfile.ZIP_DEFLATED)
    return out.getvalue()


def _renumber_shared_objects(config: Any) -> Any:
    """Keras writes ``shared_object_id`` as Python ``id()`` of the shared object (a memory address); renumber them
    in order of first appearance, which keeps the links between shared objects and drops the address."""
    numbers: dict[int, int] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: numbers.setdefault(value, len(numbers) + 1) if key == "shared_object_id" else walk(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(config)


def keras_model_to_bytes(model: keras.Model) -> bytes:
    """Serialise a model to the native ``.keras`` format (architecture and weights, no optimizer state)."""
    with tempfile.TemporaryDirectory(prefix="ptqflow-") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path, include_optimizer=False)
        with open(path, "rb") as f:
            return _normalised_archive(f.read())


def keras_model_from_bytes(data: bytes) -> keras.Model:
    """Load a stored model: a ``.keras`` archive with Keras safe mode on (no arbitrary code, such as lambdas, is
    deserialised), or a packed SavedModel (``saved_model_from_zip``)."""
    import keras

    if model_file_format(data) == "saved_model":
        return saved_model_from_zip(data)

    with tempfile.TemporaryDirectory(prefix="ptqflow-") as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as f:
            f.write(data)
        return keras.models.load_model(path, compile=False, safe_mode=True)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class UnsupportedModelFile(ValueError):
    """The bytes are neither a ``.keras`` archive nor a legacy HDF5 model."""


def model_file_format(data: bytes) -> str:
    """``keras`` (a zip with the Keras config), ``h5`` (legacy HDF5) or ``saved_model`` (a SavedModel directory
    packed by ``pack_saved_model``), from the content, never from the name."""
    if data.startswith(HDF5_SIGNATURE):
        return "h5"
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            if "config.json" in names:
                return "keras"
            if SAVED_MODEL_PROTO in names:
                return "saved_model"
    raise UnsupportedModelFile("neither a .keras archive nor a legacy HDF5 (.h5) model")


def user_model_from_bytes(data: bytes) -> tuple[keras.Model, str]:
    """Load a model a user brings: ``.keras`` or ``.h5`` with Keras safe mode on (no Lambda layer or arbitrary code
    is deserialised in either), or a packed SavedModel whose ops were checked (``saved_model_from_zip``). Returns
    the model and its format."""
    import keras

    kind = model_file_format(data)
    if kind == "keras":
        return keras_model_from_bytes(data), kind
    if kind == "saved_model":
        return saved_model_from_zip(data), kind
    with tempfile.TemporaryDirectory(prefix="ptqflow-") as tmp:
        path = os.path.join(tmp, "model.h5")
        with open(path, "wb") as f:
            f.write(data)
        return keras.models.load_model(path, compile=False, safe_mode=True), kind


SAVED_MODEL_PROTO = "saved_model.pb"
SERVING_SIGNATURE = "serving_default"
NORMALISATION_FILE = "ptqflow-input-normalisation.json"
# Ops that reach outside the model when it runs: files, Python, the network, printing and debug sinks. A
# SavedModel's graph is a program; loading it and validating the float model run it, so one that would run any of
# these is refused before it is loaded (see executed_ops).
REFUSED_OP_MARKERS = (
    "File",
    "Reader",
    "Record",
    "Dataset",
    "Iterator",
    "PyFunc",
    "Save",
    "Restore",
    "Checkpoint",
    "Print",
    "Debug",
    "Summary",
    "Socket",
    "Rpc",
    "ImmutableConst",
    "Execute",
)


class UnsafeSavedModel(ValueError):
    """A SavedModel that cannot be loaded safely, or is not a single-input model."""


def pack_saved_model(files: Iterable[tuple[str, bytes]]) -> bytes:
    """One zip of a SavedModel directory's files (relative path, content), in path order with no timestamps: the
    same directory always gives the same bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, payload in sorted(files):
            archive.writestr(zipfile.ZipInfo(name, date_time=_EPOCH), payload, zipfile.ZIP_DEFLATED)
    return out.getvalue()


def with_normalisation_record(packed: bytes, scale: float, offset: float) -> bytes:
    """The packed SavedModel with the input normalisation it is to be loaded behind (``raw * scale + offset``)."""
    with zipfile.ZipFile(io.BytesIO(packed)) as archive:
        files = [(name, archive.read(name)) for name in archive.namelist() if name != NORMALISATION_FILE]
    record = json.dumps({"scale": scale, "offset": offset}, sort_keys=True).encode()
    return pack_saved_model([*files, (NORMALISATION_FILE, record)])


def _extract(data: bytes, into: str, max_bytes: int | None = None) -> None:
    """Unpack a stored SavedModel zip: every member stays inside ``into``, and the whole stays under
    ``max_bytes`` (default: the model file limit, ``PTQFLOW_MAX_MODEL_BYTES``; the store is not trusted: a crafted
    zip could name ../ paths or inflate without bound)."""
    from ptqflow.tasks.limits import MAX_MODEL_BYTES  # the setting a user raises for a large model file

    limit = MAX_MODEL_BYTES.value if max_bytes is None else max_bytes
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
        unpacked = sum(m.file_size for m in members)
        if unpacked > limit:
            raise UnsafeSavedModel(MAX_MODEL_BYTES.refusal(f"the packed SavedModel unpacks to {unpacked:,} bytes"))
        for member in members:
            name = posixpath.normpath(member.filename)
            if member.filename.startswith("/") or name.startswith("..") or "\\" in member.filename:
                raise UnsafeSavedModel(f"the packed SavedModel names a path outside itself: {member.filename!r}")
            if member.is_dir():
                continue
            target = os.path.join(into, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)


def _serving_graph(directory: str) -> Any:
    """The meta graph holding the serving signature."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(directory, SAVED_MODEL_PROTO), "rb") as f:
        saved.ParseFromString(f.read())
    graph = next((m for m in saved.meta_graphs if SERVING_SIGNATURE in m.signature_def), None)
    if graph is None:
        raise UnsafeSavedModel(
            f"the SavedModel has no {SERVING_SIGNATURE!r} signature: export it with model.export(path) or "
            "tf.saved_model.save(obj, path, signatures=...)"
        )
    return graph


def executed_ops(directory: str) -> set[str]:
    """Every op type that loading the SavedModel and serving it can run: what the serving signature and the init
    op reach (graph nodes, and the functions they call, transitively), and the restore functions the loader calls
    to read the variables (those holding RestoreV2; their own RestoreV2 is what loading is). The saver's functions,
    which only saving runs, are not executed and not counted."""
    graph = _serving_graph(directory)
    nodes = {node.name: node for node in graph.graph_def.node}
    functions = {f.signature.name: f for f in graph.graph_def.library.function}
    ops: set[str] = set()
    seen_nodes: set[str] = set()
    seen_functions: set[str] = set()

    def called(attrs: Any) -> list[str]:
        names = []
        for value in attrs.values():
            if value.HasField("func"):
                names.append(value.func.name)
            names += [f.name for f in value.list.func]
        return names

    def visit_function(name: str) -> None:
        if name in seen_functions or name not in functions:
            return
        seen_functions.add(name)
        for node in functions[name].node_def:
            ops.add(node.op)
            for inner in called(node.attr):
                visit_function(inner)
            if node.op in functions:  # a function called as an op
                visit_function(node.op)

    def visit_node(name: str) -> None:
        name = name.lstrip("^").split(":")[0]
        if name in seen_nodes or name not in nodes:
            return
        seen_nodes.add(name)
        node = nodes[name]
        ops.add(node.op)
        for inner in called(node.attr):
            visit_function(inner)
        if node.op in functions:
            visit_function(node.op)
        for source in node.input:
            visit_node(source)

    for name in (SERVING_SIGNATURE, "__saved_model_init_op"):
        if name in graph.signature_def:
            for output in graph.signature_def[name].outputs.values():
                visit_node(output.name)
    restores = [name for name, f in functions.items() if any(node.op == "RestoreV2" for node in f.node_def)]
    for name in restores:
        visit_function(name)
    return ops - ({"RestoreV2"} if restores else set())


def check_saved_model(directory: str) -> None:
    """Refuse a SavedModel whose serving signature can reach outside the model (see REFUSED_OP_MARKERS)."""
    refused = sorted(op for op in executed_ops(directory) if any(marker in op for marker in REFUSED_OP_MARKERS))
    if refused:
        raise UnsafeSavedModel(
            f"loading and serving the SavedModel runs {', '.join(refused)}, which can reach outside the model "
            "(files, Python, the network): export only the model's computation (model.export(path))"
        )


def saved_model_from_zip(data: bytes, max_bytes: int | None = None) -> keras.Model:
    """A packed SavedModel as a Keras model (its serving signature in a ``TFSMLayer``), behind its recorded input
    normalisation if it has one. The unpacked files live as long as the model: the converter reads them again."""
    import keras

    directory = tempfile.mkdtemp(prefix="ptqflow-savedmodel-")
    try:
        _extract(data, directory, max_bytes)
        check_saved_model(directory)
        layer = keras.layers.TFSMLayer(directory, call_endpoint=SERVING_SIGNATURE, name="saved_model")
        raw = keras.Input(_sample_shape(directory), name="raw_input")
        normalisation = os.path.join(directory, NORMALISATION_FILE)
        x = raw
        if os.path.exists(normalisation):
            with open(normalisation) as f:
                record = json.load(f)
            x = keras.layers.Rescaling(float(record["scale"]), float(record["offset"]), name="input_normalisation")(x)
        outputs = layer(x)
        if isinstance(outputs, dict) and len(outputs) == 1:
            outputs = next(iter(outputs.values()))
        elif isinstance(outputs, dict):
            from ptqflow.tasks.outputs import signature_order

            # Several outputs, in the signature's order, each named after its signature key (a TFSMLayer keeps no
            # layer per output to name them by).
            outputs = [keras.layers.Identity(name=name)(outputs[name]) for name in signature_order(outputs)]
        model = keras.Model(raw, outputs, name="saved_model")
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    weakref.finalize(model, shutil.rmtree, directory, True)
    return model


def _sample_shape(directory: str) -> tuple[int, ...]:
    """One sample's shape, from the serving signature's only input."""
    inputs = list(_serving_graph(directory).signature_def[SERVING_SIGNATURE].inputs.values())
    if len(inputs) != 1:
        raise UnsafeSavedModel(
            f"the SavedModel takes {len(inputs)} inputs, which a TFSMLayer cannot name: save a model with several "
            "inputs as .keras (model.save('m.keras'))"
        )
    dims = [int(d.size) for d in inputs[0].tensor_shape.dim]
    if not dims or any(size < 0 for size in dims[1:]):
        raise UnsafeSavedModel("the SavedModel's input has no fixed sample shape: export it with a fixed shape")
    return tuple(dims[1:])

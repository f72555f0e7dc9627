"""Keras models as bytes: the one place that knows how a ``.keras`` archive is written and read, and which model
files a user may bring: ``.keras`` and legacy HDF5 ``.h5`` (each loaded with Keras safe mode on), and SavedModel
directories (packed as one zip; loaded only when everything that loading and serving it can run is on the allowlist
of compute ops, ``saved_model_ops``)."""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
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
    _check_unpacked_size(data, "the .keras archive")

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


class UnsafeModelFile(ValueError):
    """A model file that cannot be loaded safely (a SavedModel running more than compute, an archive inflating
    past the limit), or a SavedModel that is not a single-input model."""


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


def _check_unpacked_size(data: bytes, what: str, max_bytes: int | None = None) -> None:
    """Refuse a zip whose members declare more bytes than the model file limit (``PTQFLOW_MAX_MODEL_BYTES``): a
    small archive can inflate without bound, and Keras reads its config whole. Checked from the zip's directory,
    before anything is inflated; zipfile refuses to inflate a member past its declared size."""
    from ptqflow.storage.limits import MAX_MODEL_BYTES  # the setting a user raises for a large model file

    limit = MAX_MODEL_BYTES.value if max_bytes is None else max_bytes
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        unpacked = sum(m.file_size for m in archive.infolist())
    if unpacked > limit:
        raise UnsafeModelFile(MAX_MODEL_BYTES.refusal(f"{what} unpacks to {unpacked:,} bytes"))


def _extract(data: bytes, into: str, max_bytes: int | None = None) -> None:
    """Unpack a stored SavedModel zip: every member stays inside ``into``, and the whole stays under
    ``max_bytes`` (default: the model file limit, ``PTQFLOW_MAX_MODEL_BYTES``; the store is not trusted: a crafted
    zip could name ../ paths or inflate without bound)."""
    _check_unpacked_size(data, "the packed SavedModel", max_bytes)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for member in archive.infolist():
            name = posixpath.normpath(member.filename)
            if member.filename.startswith("/") or name.startswith("..") or "\\" in member.filename:
                raise UnsafeModelFile(f"the packed SavedModel names a path outside itself: {member.filename!r}")
            if member.is_dir():
                continue
            target = os.path.join(into, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)


def _saved_model(directory: str) -> Any:
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(directory, SAVED_MODEL_PROTO), "rb") as f:
        saved.ParseFromString(f.read())
    return saved


def _forget_optimizer_slots(directory: str) -> None:
    """Unmark the variables a SavedModel records as an optimizer's slots (Adam's moments, ...), in this unpacked
    copy. Loading a slot calls its optimizer's ``add_slot``, and an optimizer whose class TensorFlow cannot revive (a
    TF 1 or Keras 2 optimizer, saved with its model) comes back without one: "'_UserObject' object has no attribute
    'add_slot'". Serving never reads slots; they still load, as plain variables."""
    saved = _saved_model(directory)
    slots = sum(len(node.slot_variables) for graph in saved.meta_graphs for node in graph.object_graph_def.nodes)
    if not slots:
        return
    for graph in saved.meta_graphs:
        for node in graph.object_graph_def.nodes:
            del node.slot_variables[:]
    with open(os.path.join(directory, SAVED_MODEL_PROTO), "wb") as f:
        f.write(saved.SerializeToString())


def _serving_graph(directory: str) -> Any:
    """The meta graph holding the serving signature."""
    graph = next((m for m in _saved_model(directory).meta_graphs if SERVING_SIGNATURE in m.signature_def), None)
    if graph is None:
        raise UnsafeModelFile(
            f"the SavedModel has no {SERVING_SIGNATURE!r} signature: export it with model.export(path) or "
            "tf.saved_model.save(obj, path, signatures=...)"
        )
    return graph


def _called_functions(attrs: Any) -> list[str]:
    names = []
    for value in attrs.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names += [f.name for f in value.list.func]
    return names


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def executed_ops(meta_graph: Any) -> dict[str, set[str]]:
    """Every op type that loading and serving a meta graph can run, each with where it runs (a function's or a graph
    node's name).

    What can run is: every concrete function the object graph revives (signatures, attributes, restore and
    initializer functions, resources' create, initialize and destroy functions: anything reachable from Python once
    loaded), the graph nodes behind every signature and init op, and, for a TF1-style SavedModel without an object
    graph, the saver's restore op; each with every function it calls, transitively. The saver's save op is the one
    thing left out: only saving runs it, and ptqflow never saves a loaded SavedModel."""
    nodes = {node.name: node for node in meta_graph.graph_def.node}
    functions = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    ops: dict[str, set[str]] = {}
    seen_nodes: set[str] = set()
    seen_functions: set[str] = set()

    def visit_function(name: str) -> None:
        if name in seen_functions or name not in functions:
            return
        seen_functions.add(name)
        for node in functions[name].node_def:
            if node.op in functions:  # a function called as an op
                visit_function(node.op)
            else:
                ops.setdefault(node.op, set()).add(name)
            for inner in _called_functions(node.attr):
                visit_function(inner)

    def visit_node(tensor: str) -> None:
        name = _node_name(tensor)
        if name in seen_nodes or name not in nodes:
            return
        seen_nodes.add(name)
        node = nodes[name]
        if node.op in functions:
            visit_function(node.op)
        else:
            ops.setdefault(node.op, set()).add(name)
        for inner in _called_functions(node.attr):
            visit_function(inner)
        for source in node.input:
            visit_node(source)

    for name in meta_graph.object_graph_def.concrete_functions:
        visit_function(name)
    for signature in meta_graph.signature_def.values():
        for output in signature.outputs.values():
            visit_node(output.name)
    for collection in ("saved_model_main_op", "legacy_init_op", "table_initializer", "init_op"):
        if collection in meta_graph.collection_def:
            for name in meta_graph.collection_def[collection].node_list.value:
                visit_node(name)
    if not meta_graph.HasField("object_graph_def") and meta_graph.saver_def.restore_op_name:
        visit_node(meta_graph.saver_def.restore_op_name)
    return ops


def _restores_only_its_own_variables(meta_graph: Any, where: set[str]) -> bool:
    """Whether every RestoreV2 in ``where`` is a TF1 saver's graph node whose file prefix is the saver's filename
    tensor, which the loader feeds with the model's own variables path."""
    nodes = {node.name: node for node in meta_graph.graph_def.node}
    filename = _node_name(meta_graph.saver_def.filename_tensor_name)
    return not meta_graph.HasField("object_graph_def") and all(
        name in nodes and nodes[name].input and _node_name(nodes[name].input[0]) == filename for name in where
    )


def check_saved_model(directory: str) -> None:
    """Refuse a SavedModel unless everything that loading and serving it can run is compute
    (``saved_model_ops.COMPUTE_OPS``), and unless the serving signature is what serving calls: an object attribute
    of the same name would be called instead of it (Keras's TFSMLayer looks for an attribute first), so one is
    refused."""
    from ptqflow.storage.saved_model_ops import COMPUTE_OPS, RESTORE_OP

    saved = _saved_model(directory)
    if not any(SERVING_SIGNATURE in m.signature_def for m in saved.meta_graphs):
        _serving_graph(directory)  # raises, naming the fix
    for meta_graph in saved.meta_graphs:
        if meta_graph.object_graph_def.nodes:
            root = meta_graph.object_graph_def.nodes[0]
            if any(child.local_name == SERVING_SIGNATURE for child in root.children):
                raise UnsafeModelFile(
                    f"the SavedModel has an attribute named like its signature {SERVING_SIGNATURE!r}, which would be "
                    "called instead of the signature: export the model with model.export(path)"
                )
        ops = executed_ops(meta_graph)
        where_restored = ops.pop(RESTORE_OP, set())
        if where_restored and not _restores_only_its_own_variables(meta_graph, where_restored):
            ops[RESTORE_OP] = where_restored
        refused = sorted(op for op in ops if op not in COMPUTE_OPS)
        if refused:
            raise UnsafeModelFile(
                f"loading or serving the SavedModel would run {', '.join(refused)}, which ptqflow does not run from "
                "a model file (it runs only compute ops TFLite can convert; files, Python, the network and other "
                "outside effects are refused): export only the model's computation (model.export(path))"
            )


def saved_model_from_zip(data: bytes, max_bytes: int | None = None) -> keras.Model:
    """A packed SavedModel as a Keras model (its serving signature in a ``TFSMLayer``), behind its recorded input
    normalisation if it has one. The unpacked files live as long as the model: the converter reads them again."""
    import keras

    directory = tempfile.mkdtemp(prefix="ptqflow-savedmodel-")
    try:
        _extract(data, directory, max_bytes)
        check_saved_model(directory)
        _forget_optimizer_slots(directory)
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
        raise UnsafeModelFile(
            f"the SavedModel takes {len(inputs)} inputs, which a TFSMLayer cannot name: save a model with several "
            "inputs as .keras (model.save('m.keras'))"
        )
    dims = [int(d.size) for d in inputs[0].tensor_shape.dim]
    if not dims or any(size < 0 for size in dims[1:]):
        raise UnsafeModelFile("the SavedModel's input has no fixed sample shape: export it with a fixed shape")
    return tuple(dims[1:])


def signature_order(names: Iterable[str]) -> list[str]:
    """A serving signature's output names in the model's order: ``output_0``, ``output_1``, ... by number (as Keras
    and the converter name a list of outputs), then named outputs (a dict's keys) by name."""

    def position(name: str) -> tuple[int, str]:
        match = re.fullmatch(r"output_(\d+)", name)
        return (int(match.group(1)), "") if match else (1 << 30, name)

    return sorted(names, key=position)

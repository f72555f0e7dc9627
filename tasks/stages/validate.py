"""Stage 5, validate: the float, float .tflite and quantized .tflite models measured on the test split with the
LiteRT interpreter (``tasks.evaluation.validation``); writes report.json. The report for people is the report
stage's (``tasks.stages.report``), so that a change to a view reruns no validation."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from ptqflow.storage.keras_models import keras_model_from_bytes
from ptqflow.storage.store import ArtifactRef, ArtifactStore
from ptqflow.storage.tables import ParquetRowGroups, TensorTable, no_labels, read_parquet, write_parquet_bytes
from ptqflow.tasks.core.artifacts import (
    CalibrationSet,
    ConvertedModels,
    FidelityFigures,
    FloatOutputs,
    PredictedRows,
    RefusedCall,
    RepairResult,
    SampledDataset,
    TflmOnRows,
    TrainedModel,
    ValidationResult,
    WorstLayer,
)
from ptqflow.tasks.core.caching import StageCachePolicy
from ptqflow.tasks.core.errors import secrets_kept_out
from ptqflow.tasks.core.parameters import (
    ConversionParameters,
    DeviceTarget,
    QuantizationScheme,
    ValidationParameters,
)
from ptqflow.tasks.core.progress import report
from ptqflow.tasks.core.validation_report import LayerError, ModelKind, ValidationReport
from ptqflow.tasks.evaluation.fidelity import fidelity_in_words
from ptqflow.tasks.evaluation.interpreter import RowFailure
from ptqflow.tasks.evaluation.shards import Predictions, predict_rows
from ptqflow.tasks.evaluation.tflm import TflmRows, tflm_on_rows, tflm_rows
from ptqflow.tasks.evaluation.validation import (
    Evaluation,
    mixed_cost,
    npu_compilations,
    per_layer_errors,
    repair_cost,
    window_rows,
)
from ptqflow.tasks.quantization.integer import asks_full_integer, floats_not_asked_for
from ptqflow.tasks.release.firmware import FIRMWARE_LABELS, model_data_files, vela_label


@task(
    name="predict_test_rows",
    cache_policy=StageCachePolicy(module=__name__),
    persist_result=True,
    result_serializer="json",
)
@secrets_kept_out()
def predict_test_rows(
    store_url: str,
    dataset: SampledDataset,
    trained: TrainedModel,
    converted: ConvertedModels,
    batch_size: int,
    num_threads: int | None,
    start: int,
    stop: int,
    tflm: bool = False,
    tflm_samples: int | None = None,
) -> PredictedRows:
    """Every model's outputs on test rows ``start`` to ``stop``, read from the store where this runs (a Dask
    worker, a thread): one range of a sharded validation (``tasks.evaluation.shards``). With ``tflm``, also the
    quantized model's on TFLite Micro, on the rows of the range it runs (all, or ``tflm_samples`` drawn from the
    split)."""
    store = ArtifactStore(store_url)
    with store.open(dataset.test) as f:
        rows = ParquetRowGroups(f).read_rows(start, stop)
    quantized = store.read_bytes(converted.quantized)
    predicted = predict_rows(
        keras_model_from_bytes(store.read_bytes(trained.model)),
        store.read_bytes(converted.float_model),
        quantized,
        rows.features,
        batch_size,
        num_threads,
        dataset.spec.inputs,
    )
    stacked = np.stack([predicted.keras, predicted.float_tflite, predicted.quantized_tflite], axis=1)
    table = TensorTable(np.ascontiguousarray(stacked, np.float32), no_labels(len(rows)))

    def calls(failures: tuple[RowFailure, ...]) -> tuple[RefusedCall, ...]:
        return tuple(RefusedCall(start=f.start, stop=f.stop, message=f.message) for f in failures)

    on_tflm = None
    if tflm:
        selected, _ = tflm_rows(dataset.counts["test"], tflm_samples)
        mine = selected[(selected >= start) & (selected < stop)]
        on_tflm = TflmOnRows()  # none of the draw's rows is in this range
        if len(mine):
            ran = tflm_on_rows(
                quantized,
                rows.features[mine - start],
                mine,
                dataset.spec.inputs,
                litert=predicted.quantized_tflite[mine - start],
            )
            outputs = None
            if ran.outputs is not None and len(ran.rows):
                ran_table = TensorTable(np.ascontiguousarray(ran.outputs, np.float32), ran.rows.astype(np.int64))
                outputs = store.put_bytes(write_parquet_bytes(ran_table), ".parquet")
            on_tflm = TflmOnRows(outputs=outputs, refusal=ran.refusal)
    return PredictedRows(
        start=start,
        stop=stop,
        outputs=store.put_bytes(write_parquet_bytes(table), ".parquet"),
        float_refused=calls(predicted.float_refused),
        quantized_refused=calls(predicted.quantized_refused),
        tflm=on_tflm,
    )


class StoredPredictions:
    """The shards' predictions (``predict_test_rows``), read range by range in row order: what is held is the shards
    the last range touched."""

    def __init__(self, store: ArtifactStore, shards: tuple[PredictedRows, ...]) -> None:
        self._store = store
        self._shards = sorted(shards, key=lambda shard: shard.start)
        self._loaded: dict[int, Predictions] = {}

    def _part(self, shard: PredictedRows) -> Predictions:
        if shard.start not in self._loaded:
            with self._store.open(shard.outputs) as f:
                stacked = read_parquet(f).features
            self._loaded[shard.start] = Predictions(
                keras=stacked[:, 0],
                float_tflite=stacked[:, 1],
                quantized_tflite=stacked[:, 2],
                float_refused=_failures(shard.float_refused),
                quantized_refused=_failures(shard.quantized_refused),
                tflm=self._on_tflm(shard, stacked[:, 2]),
            )
        return self._loaded[shard.start]

    def _on_tflm(self, shard: PredictedRows, quantized: np.ndarray) -> TflmRows | None:
        """TFLM's part of the shard, with LiteRT's outputs on the same rows (they are in the shard's table)."""
        if shard.tflm is None:
            return None
        litert = quantized.reshape(len(quantized), -1)
        ran = np.zeros(0, np.int64)
        outputs = np.zeros((0, litert.shape[1]), np.float32)
        if shard.tflm.outputs is not None:
            with self._store.open(shard.tflm.outputs) as f:
                table = read_parquet(f)
            ran, outputs = table.labels, table.features.reshape(len(table), -1)
        return TflmRows(ran, litert[ran - shard.start], outputs, shard.tflm.refusal)

    def rows(self, start: int, stop: int) -> Predictions:
        """Test rows ``start`` to ``stop``, refused calls counted from ``start``."""
        touched = [shard for shard in self._shards if shard.start < stop and shard.stop > start]
        if not touched or touched[0].start > start or touched[-1].stop < stop:
            raise ValueError(f"the shards' predictions do not cover test rows {start} to {stop}")
        for begun in [begun for begun in self._loaded if begun < touched[0].start]:
            del self._loaded[begun]  # ranges come in row order: an earlier shard is not read again
        first = touched[0].start
        joined = Predictions.joined([self._part(shard) for shard in touched])
        return joined.rows(start - first, stop - first, first_row=first)


def _failures(calls: tuple[RefusedCall, ...]) -> tuple[RowFailure, ...]:
    return tuple(RowFailure(call.start, call.stop, call.message) for call in calls)


@task(
    name="validate_with_interpreter",
    cache_policy=StageCachePolicy(module=__name__),
    persist_result=True,
    result_serializer="json",
)
@secrets_kept_out()
def validate_with_interpreter(
    store_url: str,
    dataset: SampledDataset,
    trained: TrainedModel,
    converted: ConvertedModels,
    params: ValidationParameters,
    calibration: CalibrationSet | None = None,
    conversion: ConversionParameters | None = None,
    repair: RepairResult | None = None,
    float_outputs: FloatOutputs | None = None,
    predictions: tuple[PredictedRows, ...] = (),
) -> ValidationResult:
    """Evaluate the three models on the test split; with the calibration set and conversion options, also the
    per-layer quantization error; with a repair, the cost of what it kept in float. Writes report.json to the
    store (its renderings are the report step's, ``tasks.stages.report``). ``float_outputs``: the Keras model's outputs
    on this test split, if a stage (the sweep's) predicted them already; ``predictions``: every model's outputs,
    range by range (``predict_test_rows``), when the flow sharded them."""
    store = ArtifactStore(store_url)
    keras_model = keras_model_from_bytes(store.read_bytes(trained.model))
    quantized_bytes = store.read_bytes(converted.quantized)  # read once: evaluation, targets, firmware, audit
    others = {}  # judged on the same windows as the shipped model
    if converted.mixed is not None:
        others["int8"] = store.read_bytes(converted.mixed.int8_model)
    if repair is not None:
        others["unrepaired"] = store.read_bytes(repair.unrepaired)
    evaluation = Evaluation(
        keras_model,
        store.read_bytes(converted.float_model),
        quantized_bytes,
        params,
        dataset.counts["test"],
        list(dataset.spec.class_names),
        dataset.spec.task,
        others,
    )
    stored = StoredPredictions(store, predictions) if predictions else None
    window = window_rows(int(np.prod(dataset.spec.shape)) * np.dtype(dataset.spec.dtype).itemsize, params.batch_size)
    with contextlib.ExitStack() as files:
        test = ParquetRowGroups(files.enter_context(store.open(dataset.test)))
        float_given = (
            ParquetRowGroups(files.enter_context(store.open(float_outputs.outputs))).iter_rows(window)
            if float_outputs is not None and stored is None
            else None
        )
        start = 0
        for rows in test.iter_rows(window):
            stop = start + len(rows)
            evaluation.add(
                start,
                rows.features,
                rows.labels,
                stored.rows(start, stop) if stored is not None else None,
                next(float_given).features if float_given is not None else None,  # the same windows, in step
            )
            start = stop
    metrics = evaluation.metrics()
    layers: list[LayerError] = []
    layers_unavailable: str | None = "no calibration set given"
    if conversion is not None and conversion.scheme is not QuantizationScheme.full_integer:
        layers_unavailable = f"measured for full-integer quantization only (this model: {conversion.scheme.value})"
    elif calibration is not None and conversion is not None:
        report("validate_with_interpreter", "per-layer quantization error (QuantizationDebugger)")
        with store.open(calibration.table) as f:
            calibration_features = read_parquet(f).features
        layers, layers_unavailable = per_layer_errors(keras_model, calibration_features, conversion, 64)
    metrics = metrics.model_copy(update={"layers": layers, "layers_unavailable": layers_unavailable})
    device_files: dict[str, ArtifactRef] = {}
    if metrics.validated and params.targets != (DeviceTarget.litert,):
        tflm = evaluation.tflm_figures() if DeviceTarget.tflm in params.targets else None
        npu = []
        for compilation in npu_compilations(quantized_bytes, params):
            figures = compilation.figures
            if compilation.compiled is not None:
                compiled = store.put_bytes(compilation.compiled, suffix=".tflite")
                device_files[vela_label(figures.target)] = compiled
                figures = figures.model_copy(update={"compiled_model": compiled})
            npu.append(figures)
        if tflm is not None and tflm.ran:
            for name, data in model_data_files(quantized_bytes, converted.quantized.sha256, tflm).items():
                device_files[FIRMWARE_LABELS[name]] = store.put_bytes(data, suffix=Path(name).suffix)
        metrics = metrics.model_copy(update={"targets": params.targets, "tflm": tflm, "npu": npu})
    if converted.mixed is not None and metrics.validated:
        report("validate_with_interpreter", "mixed16: the cost of the int16 layers against all-int8")
        cost = mixed_cost(converted.mixed, others["int8"], evaluation.judged("int8"), metrics, quantized_bytes)
        metrics = metrics.model_copy(update={"mixed": cost})
    if repair is not None:
        before = evaluation.judged("unrepaired")
        metrics = metrics.model_copy(update={"repair": repair_cost(repair, others["unrepaired"], before, metrics)})
    document = ValidationReport(
        dataset=dataset.manifest,
        model=trained.model,
        quantized_model=converted.quantized,
        float_tflite=converted.float_model,
        conversion=conversion.model_dump(mode="json") if conversion else None,
        metrics=metrics,
    )
    report_ref = store.put_json(document.model_dump(mode="json"))
    stayed_float = (
        floats_not_asked_for(quantized_bytes, conversion)
        if conversion is not None and asks_full_integer(conversion)
        else []
    )
    logger = get_run_logger()
    if metrics.validated:
        logger.info("%s; full integer: %s", fidelity_in_words(metrics), metrics.audit.full_integer)
    else:
        logger.warning("not validated: %s", metrics.not_validated_reason)
    return ValidationResult(
        report=report_ref,
        validated=metrics.validated,
        not_validated_reason=metrics.not_validated_reason,
        float_tensors=tuple(metrics.audit.float_tensors),
        full_integer=metrics.audit.full_integer,
        floats_not_asked_for=tuple(sorted({op.op for op in stayed_float})),
        int16_layers=tuple(layer.layer for layer in converted.mixed.int16_layers) if converted.mixed else (),
        worst_layers=tuple(
            WorstLayer(layer=layer.layer, op=layer.op, tensor=layer.tensor, badness=layer.badness)
            for layer in layers[:5]
        ),
        **metrics.model_dump(include=set(FidelityFigures.model_fields)),
        float_accuracy=metrics.float_accuracy,
        tflite_float_accuracy=metrics.tflite_float_accuracy,
        quantized_accuracy=metrics.quantized_accuracy,
        accuracy_drop_pp=metrics.accuracy_drop_pp,
        agreement=metrics.agreement,
        float_bytes=metrics.float_bytes,
        quantized_bytes=metrics.quantized_bytes,
        arena_bytes=metrics.device[ModelKind.quantized_tflite].arena_bytes
        if ModelKind.quantized_tflite in metrics.device
        else None,
        rerun_max_difference=metrics.rerun_max_difference,
        targets=params.targets,
        tflm=metrics.tflm,
        npu=tuple(metrics.npu),
        device_files=device_files,
    )

"""Repair (--repair): the quantized model with its worst layers kept in float, chosen by per-layer error
(``tasks.evaluation.repair``); under --ops int8, with the layers that need it most raised to int16 activations
(scheme mixed16's search, ``tasks.evaluation.mixed``): integer-only either way the ops ask. Between conversion and
validation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from prefect import get_run_logger, task

from ptqflow.storage.keras_models import keras_model_from_bytes
from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import iter_feature_batches, read_parquet
from ptqflow.tasks.core.artifacts import (
    CalibrationSet,
    ConvertedModels,
    RepairResult,
    SampledDataset,
    TrainedModel,
    ValidationResult,
)
from ptqflow.tasks.core.caching import StageCachePolicy
from ptqflow.tasks.core.errors import ConversionFailed, secrets_kept_out
from ptqflow.tasks.core.parameters import (
    ConversionParameters,
    GateParameters,
    QuantizationScheme,
    RepairKind,
    RepairParameters,
)
from ptqflow.tasks.core.validation_report import ValidationReport
from ptqflow.tasks.evaluation.mixed import quantization
from ptqflow.tasks.evaluation.repair import keep_worst_layers_float

if TYPE_CHECKING:
    import keras


@task(
    name="repair_quantization",
    cache_policy=StageCachePolicy(module=__name__),
    persist_result=True,
    result_serializer="json",
)
@secrets_kept_out()
def repair_quantization(
    store_url: str,
    dataset: SampledDataset,
    trained: TrainedModel,
    calibration: CalibrationSet,
    converted: ConvertedModels,
    validated: ValidationResult,
    conversion: ConversionParameters,
    gate: GateParameters,
    params: RepairParameters,
) -> RepairResult:
    store = ArtifactStore(store_url)
    model = keras_model_from_bytes(store.read_bytes(trained.model))
    if params.kind(conversion) is RepairKind.int16:
        return _raise_to_int16(store, model, calibration, converted, conversion)
    ranked = ValidationReport.model_validate(store.read_json(validated.report)).metrics.layers
    with store.open(dataset.validation) as f:
        validation = read_parquet(f)
    with store.open(calibration.table) as f:
        debug_features = read_parquet(f).features

    def calibration_batches() -> Iterator[np.ndarray]:
        with store.open(calibration.table) as f:
            yield from iter_feature_batches(f, conversion.calibration_batch_size)

    repaired, steps, message = keep_worst_layers_float(
        model,
        calibration_batches,
        debug_features,
        conversion,
        store.read_bytes(converted.quantized),
        ranked,
        validation.features,
        validation.labels,
        gate,
        params.max_float_layers,
        dataset.spec.task,
    )
    get_run_logger().info(message)
    return RepairResult(
        repaired=store.put_bytes(repaired, ".tflite") if repaired is not None else None,
        unrepaired=converted.quantized,
        succeeded=repaired is not None,
        float_layers=steps[-1].float_layers if steps else (),
        steps=tuple(steps),
        message=message,
    )


def _raise_to_int16(
    store: ArtifactStore,
    model: keras.Model,
    calibration: CalibrationSet,
    converted: ConvertedModels,
    conversion: ConversionParameters,
) -> RepairResult:
    """Repair under --ops int8: scheme mixed16 on the same calibration set; the cost is measured against the int8
    model that failed the gate."""

    def calibration_batches() -> Iterator[np.ndarray]:
        with store.open(calibration.table) as f:
            yield from iter_feature_batches(f, conversion.calibration_batch_size)

    options = conversion.model_copy(update={"scheme": QuantizationScheme.mixed16})
    failed = RepairResult(
        unrepaired=converted.quantized, succeeded=False, float_layers=(), steps=(), message="", mixed=None
    )
    try:
        quantized, search = quantization(model, calibration_batches, options)
    except ConversionFailed as error:
        return failed.model_copy(update={"message": f"int16 repair could not convert: {error}"})
    assert search is not None  # scheme mixed16 always reports its search
    if not search.int16_layers:
        return failed.model_copy(update={"message": "no layer's int16 activations brought the model closer to float"})
    mixed = search.choice(options.max_int16_fraction, converted.quantized)  # against what would ship unrepaired
    message = (
        f"int16 repair raised {len(search.int16_layers)} of {search.layers} layers "
        f"({', '.join(layer.layer for layer in mixed.int16_layers)})"
    )
    get_run_logger().info(message)
    return RepairResult(
        repaired=store.put_bytes(quantized, ".tflite"),
        unrepaired=converted.quantized,
        succeeded=True,
        float_layers=(),
        steps=(),
        message=message,
        mixed=mixed,
    )

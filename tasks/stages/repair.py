"""Repair (--repair): the quantized model with its worst layers kept in float, chosen by per-layer error
(``tasks.evaluation.repair``), between conversion and validation."""

from __future__ import annotations

from collections.abc import Iterator

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
from ptqflow.tasks.core.errors import secrets_kept_out
from ptqflow.tasks.core.parameters import ConversionParameters, GateParameters, RepairParameters
from ptqflow.tasks.core.validation_report import ValidationReport
from ptqflow.tasks.evaluation.repair import keep_worst_layers_float


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

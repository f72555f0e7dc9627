"""The sweep's tasks: each configuration of the grid (``tasks.sweep.grid``) quantized and evaluated, and the float
reference. Each reads its inputs from the artifact store and writes its outputs there, handing on small
references: it can run on any Dask worker that reaches the store. (The sweep's report is ``tasks.stages.report``.)"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from prefect import task

from ptqflow.storage.keras_models import keras_model_from_bytes
from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import TensorTable, read_parquet, write_parquet_bytes
from ptqflow.tasks.core.artifacts import CalibrationSet, FloatOutputs, ModelOutput, SampledDataset, TrainedModel
from ptqflow.tasks.core.caching import StageCachePolicy
from ptqflow.tasks.core.errors import secrets_kept_out
from ptqflow.tasks.core.parameters import ConversionParameters, ValidationParameters
from ptqflow.tasks.evaluation.mixed import quantization
from ptqflow.tasks.models.feeds import predict_keras
from ptqflow.tasks.quantization.converter import convert_float, stored_calibration_batches
from ptqflow.tasks.sweep.ranking import (
    CandidateModel,
    ConfigurationMetrics,
    configuration_metrics,
)

_STAGE_OPTIONS: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}


@task(name="quantize_configuration", cache_policy=StageCachePolicy(module=__name__), **_STAGE_OPTIONS)
@secrets_kept_out()
def quantize_configuration(
    store_url: str, trained: TrainedModel, calibration: CalibrationSet | None, params: ConversionParameters
) -> CandidateModel:
    """The model quantized under ``params`` (``calibration`` is None for schemes that take none)."""
    store = ArtifactStore(store_url)
    model = keras_model_from_bytes(store.read_bytes(trained.model))

    def no_batches() -> Iterator[np.ndarray]:
        return iter(())

    batches = (
        stored_calibration_batches(store, calibration, params.calibration_batch_size, "quantize_configuration")
        if calibration is not None
        else no_batches
    )
    started = time.perf_counter()
    model_bytes = quantization(model, batches, params)[0]
    seconds = round(time.perf_counter() - started, 3)
    return CandidateModel(model=store.put_bytes(model_bytes, ".tflite"), conversion_seconds=seconds)


@task(name="convert_float_reference", cache_policy=StageCachePolicy(module=__name__), **_STAGE_OPTIONS)
@secrets_kept_out()
def convert_float_reference(store_url: str, trained: TrainedModel) -> CandidateModel:
    """The float ``.tflite``: the row every configuration is compared with."""
    store = ArtifactStore(store_url)
    model = keras_model_from_bytes(store.read_bytes(trained.model))
    started = time.perf_counter()
    model_bytes = convert_float(model)
    seconds = round(time.perf_counter() - started, 3)
    return CandidateModel(model=store.put_bytes(model_bytes, ".tflite"), conversion_seconds=seconds)


@task(name="predict_float_outputs", cache_policy=StageCachePolicy(module=__name__), **_STAGE_OPTIONS)
@secrets_kept_out()
def predict_float_outputs(
    store_url: str, dataset: SampledDataset, trained: TrainedModel, batch_size: int
) -> FloatOutputs:
    """The float Keras model's outputs on the test split, once: what every configuration is compared with."""
    store = ArtifactStore(store_url)
    with store.open(dataset.test) as f:
        test = read_parquet(f)
    model = keras_model_from_bytes(store.read_bytes(trained.model))
    outputs = predict_keras(model, test.features, batch_size, test.inputs)
    table = TensorTable(features=np.ascontiguousarray(outputs, dtype=np.float32), labels=test.labels)
    return FloatOutputs(outputs=store.put_bytes(write_parquet_bytes(table), ".parquet"))


@task(name="evaluate_configuration", cache_policy=StageCachePolicy(module=__name__), **_STAGE_OPTIONS)
@secrets_kept_out()
def evaluate_configuration(
    store_url: str,
    dataset: SampledDataset,
    reference: FloatOutputs,
    candidate: CandidateModel,
    batch_size: int,
    num_threads: int,
    outputs: tuple[ModelOutput, ...] = (),
    devices: ValidationParameters | None = None,
) -> ConfigurationMetrics:
    """One configuration's figures; ``outputs``: the float model's (``TrainedModel.outputs``); ``devices``: the
    device targets to measure it on besides LiteRT (None: LiteRT only, and the key of a sweep without targets)."""
    store = ArtifactStore(store_url)
    with store.open(dataset.test) as f:
        test = read_parquet(f)
    with store.open(reference.outputs) as f:
        float_outputs = read_parquet(f).features
    metrics = configuration_metrics(
        float_outputs,
        store.read_bytes(candidate.model),
        test.features,
        test.labels,
        batch_size,
        num_threads,
        list(dataset.spec.class_names),
        dataset.spec.task,
        outputs,
        dataset.spec.inputs,
        devices,
    )
    return ConfigurationMetrics(
        model=candidate.model,
        conversion_seconds=candidate.conversion_seconds,
        measured_on=f"{socket.gethostname()} pid {os.getpid()}",
        **metrics,
    )

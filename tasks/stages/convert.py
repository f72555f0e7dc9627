"""Stage 4, convert: the float and the quantized .tflite models, from the trained model and the calibration set
(``tasks.quantization.converter``)."""

from __future__ import annotations

from prefect import get_run_logger, task

from ptqflow.storage.keras_models import keras_model_from_bytes
from ptqflow.storage.store import ArtifactStore
from ptqflow.tasks.core.artifacts import CalibrationSet, ConvertedModels, TrainedModel
from ptqflow.tasks.core.caching import StageCachePolicy
from ptqflow.tasks.core.errors import secrets_kept_out
from ptqflow.tasks.core.parameters import ConversionParameters
from ptqflow.tasks.core.progress import report
from ptqflow.tasks.evaluation.mixed import quantization
from ptqflow.tasks.quantization.converter import convert_float, stored_calibration_batches


@task(
    name="convert_to_tflite",
    cache_policy=StageCachePolicy(module=__name__),
    persist_result=True,
    result_serializer="json",
)
@secrets_kept_out()
def convert_to_tflite(
    store_url: str, trained: TrainedModel, calibration: CalibrationSet, params: ConversionParameters
) -> ConvertedModels:
    store = ArtifactStore(store_url)
    model = keras_model_from_bytes(store.read_bytes(trained.model))
    batches = stored_calibration_batches(store, calibration, params.calibration_batch_size, "convert_to_tflite")
    quantized_bytes, search = quantization(model, batches, params)
    report("convert_to_tflite", "converting the float model")
    float_bytes = convert_float(model)
    quantized = store.put_bytes(quantized_bytes, ".tflite")
    float_model = store.put_bytes(float_bytes, ".tflite")
    get_run_logger().info("quantized model %d bytes, float model %d bytes", quantized.bytes, float_model.bytes)
    mixed = None
    if search is not None:
        mixed = search.choice(params.max_int16_fraction, store.put_bytes(search.int8_model, ".tflite"))
        get_run_logger().info(
            "mixed16: %d of %d layers in int16 (%s)",
            len(mixed.int16_layers),
            mixed.layers,
            ", ".join(layer.layer for layer in mixed.int16_layers) or "none",
        )
    return ConvertedModels(quantized=quantized, float_model=float_model, mixed=mixed)

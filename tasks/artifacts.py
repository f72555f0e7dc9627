"""What stages hand to each other: small JSON-serialisable records of artifact references and facts.

Never arrays or models: each stage can run in its own process or on another machine, and Prefect persists these
records (as JSON) as the task results that cache hits return.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field

from storage.store import ArtifactRef


class StageOutput(BaseModel):
    model_config = ConfigDict(frozen=True)

    def artifact_refs(self) -> Iterator[ArtifactRef]:
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, ArtifactRef):
                yield value


class FeatureSpec(BaseModel):
    """What the model's input looks like: one sample's shape and raw dtype, and the raw value range."""

    model_config = ConfigDict(frozen=True)

    shape: tuple[int, ...]
    dtype: str
    value_range: tuple[float, float]
    n_classes: int
    class_names: tuple[str, ...]


class SampledDataset(StageOutput):
    manifest: ArtifactRef = Field(description="dataset.json: the spec and the three splits.")
    train: ArtifactRef
    validation: ArtifactRef
    test: ArtifactRef
    spec: FeatureSpec
    counts: dict[str, int]


class TrainedModel(StageOutput):
    model: ArtifactRef = Field(description="The float Keras model (.keras).")
    epochs_run: int
    best_epoch: int
    validation_accuracy: float


class CalibrationSet(StageOutput):
    table: ArtifactRef = Field(description="Calibration samples as a Parquet tensor table.")
    samples: int


class ConvertedModels(StageOutput):
    quantized: ArtifactRef = Field(description="The quantized .tflite.")
    float_model: ArtifactRef = Field(description="The float .tflite (no optimizations), for comparison.")


class ValidationResult(StageOutput):
    report: ArtifactRef = Field(description="report.json with every metric and the dtype audit.")
    float_accuracy: float
    tflite_float_accuracy: float
    quantized_accuracy: float
    accuracy_drop_pp: float
    agreement: float
    float_bytes: int
    quantized_bytes: int
    full_integer: bool
    float_tensors: tuple[str, ...]

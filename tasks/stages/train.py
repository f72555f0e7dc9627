"""Stage 2, train: the float Keras model, fitted on the training split or the user's own model loaded and
checked (``tasks.models.training``), written to the store as a .keras file."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ptqflow.storage.keras_models import keras_model_to_bytes, model_file_format
from ptqflow.storage.store import ArtifactStore
from ptqflow.storage.tables import ParquetRowGroups, read_parquet
from ptqflow.tasks.core.artifacts import SampledDataset, TrainedModel
from ptqflow.tasks.core.caching import StageCachePolicy
from ptqflow.tasks.core.errors import secrets_kept_out
from ptqflow.tasks.core.parameters import TrainingParameters
from ptqflow.tasks.evaluation.metrics import accuracy, mean_absolute_error
from ptqflow.tasks.models.feeds import predict_keras
from ptqflow.tasks.models.outputs import model_outputs
from ptqflow.tasks.models.training import (
    fit_default_model,
    load_trained_model,
    model_url_fingerprint,
    user_model_module,
)


@task(name="fingerprint_model", cache_policy=NO_CACHE, persist_result=False)
@secrets_kept_out()
def fingerprint_model(params: TrainingParameters) -> str:
    return model_url_fingerprint(params.model_url)


def _user_code(inputs: dict) -> list[str]:
    module = user_model_module(inputs["params"].model)
    return [module] if module else []


@task(
    name="train_float_model",
    cache_policy=StageCachePolicy(module=__name__, extra_code=_user_code),
    persist_result=True,
    result_serializer="json",
)
@secrets_kept_out()
def train_float_model(
    store_url: str, dataset: SampledDataset, params: TrainingParameters, seed: int, model_fingerprint: str = ""
) -> TrainedModel:
    """Train the model on the train split, early-stopping on the validation split; or, with ``model_url``, take
    the trained model as given (``model_fingerprint`` only keys the cache to the file's current content)."""
    store = ArtifactStore(store_url)
    if params.model_url:
        with store.open(dataset.validation) as f:
            validation = read_parquet(f)
        data, model = load_trained_model(params.model_url, dataset.spec, params)
        outputs = predict_keras(model, validation.features, inputs=dataset.spec.inputs)
        ref = store.put_bytes(data, ".zip" if model_file_format(data) == "saved_model" else ".keras")
        get_run_logger().info("using the trained model %s (sha256 %s)", params.model_url, ref.sha256)
        return TrainedModel(
            model=ref,
            epochs_run=0,
            best_epoch=0,
            validation_accuracy=accuracy(outputs, validation.labels) if dataset.spec.n_classes else None,
            validation_mae=mean_absolute_error(outputs, validation.labels) if dataset.spec.n_targets else None,
            outputs=model_outputs(model),
        )
    # Both splits are read group by group while the model trains: memory does not grow with the split.
    with store.open(dataset.train) as train_file, store.open(dataset.validation) as validation_file:
        train_groups, validation_groups = ParquetRowGroups(train_file), ParquetRowGroups(validation_file)
        model, outcome = fit_default_model(dataset.spec, train_groups, validation_groups, params, seed)
    ref = store.put_bytes(keras_model_to_bytes(model), ".keras")
    figure = (
        f"accuracy {outcome.validation_accuracy:.4f}"
        if outcome.validation_accuracy is not None
        else f"MAE {outcome.validation_mae:.4g}"
    )
    get_run_logger().info("trained %d epochs (best %d), validation %s", outcome.epochs_run, outcome.best_epoch, figure)
    return TrainedModel(
        model=ref,
        epochs_run=outcome.epochs_run,
        best_epoch=outcome.best_epoch,
        validation_accuracy=outcome.validation_accuracy,
        validation_mae=outcome.validation_mae,
        outputs=model_outputs(model),
    )

"""The release's tasks: the run's manifest, the export (copy, verify, move the pointer) and the comparison with
the champion (``tasks.release``)."""

from __future__ import annotations

import functools

from prefect import task
from prefect.cache_policies import NO_CACHE

from ptqflow.storage.store import ArtifactRef, ArtifactStore
from ptqflow.storage.tables import read_parquet
from ptqflow.tasks.core.artifacts import SampledDataset
from ptqflow.tasks.core.errors import secrets_kept_out
from ptqflow.tasks.core.parameters import GateParameters, ModelTask
from ptqflow.tasks.core.validation_report import PromotionDecision
from ptqflow.tasks.evaluation.interpreter import RowFailure, predict_tflite, refused_rows
from ptqflow.tasks.evaluation.metrics import accuracy, mean_absolute_error
from ptqflow.tasks.release.documents import RunManifest
from ptqflow.tasks.release.manifest import manifest_key
from ptqflow.tasks.release.promotion import (
    champion_model,
    decide,
    decide_on_error,
    exported_manifest,
    exported_seen_rows,
    not_comparable,
    promoted_without_labels,
    read_pointer,
    rows_unseen_by,
)
from ptqflow.tasks.release.publish import ExportRecord, export_store, publish_run


@task(name="write_run_manifest", cache_policy=NO_CACHE, persist_result=False)
@secrets_kept_out()
def write_run_manifest(store_url: str, manifest: RunManifest) -> str:
    """Create ``runs/<run_id>.json``; refuses to replace an existing manifest. Returns its URI."""
    store = ArtifactStore(store_url)
    data = manifest.to_bytes()
    key = manifest_key(manifest.run_id)
    try:
        return store.write_named(key, data, exclusive=True)
    except FileExistsError:
        # A retried flow run reaching the end again: the first complete record stands.
        return store.uri_for(key)


@task(name="publish_export", cache_policy=NO_CACHE, persist_result=False)
@secrets_kept_out()
def publish_export(
    store_url: str,
    export_url: str,
    run_id: str,
    artifacts: dict[str, ArtifactRef],
    manifest: RunManifest,
    compared_with: str | None,
) -> ExportRecord:
    return publish_run(ArtifactStore(store_url), export_store(export_url), run_id, artifacts, manifest, compared_with)


@task(name="compare_with_champion", cache_policy=NO_CACHE, persist_result=False)
@secrets_kept_out()
def compare_with_champion(
    store_url: str,
    export_url: str,
    dataset: SampledDataset,
    challenger: ArtifactRef,
    challenger_figure: float | None,
    gate: GateParameters,
    batch_size: int = 256,
) -> PromotionDecision:
    """Evaluate the champion and the challenger (``challenger``, a model that passed its gate with
    ``challenger_figure``, its accuracy or MAE, on the whole test split) on the test rows the champion never trained
    on; decide. Never cached: the champion changes under it."""
    export = export_store(export_url)
    pointer = read_pointer(export)
    task = dataset.spec.task
    if task is ModelTask.unlabeled:
        return promoted_without_labels(pointer, gate.promotion_tolerance)
    metric = "mae" if task is ModelTask.regression else "accuracy"
    if pointer is None:
        if task is ModelTask.regression:
            return PromotionDecision(
                promote=True,
                metric="mae",
                challenger_accuracy=None,
                challenger_mae=challenger_figure,
                tolerance_pp=gate.promotion_tolerance,
                message="promoted: there is no exported model yet",
            )
        return decide(challenger_figure, True, gate.promotion_tolerance)
    not_fair = functools.partial(not_comparable, challenger_figure, pointer, gate.promotion_tolerance, metric=metric)
    store = ArtifactStore(store_url)
    with store.open(dataset.test) as f:
        test = read_parquet(f)
    champion_manifest = exported_manifest(export, pointer)
    unseen = None
    if champion_manifest is not None:
        seen_ref = pointer.files.get("seen_rows")
        seen_rows = functools.partial(exported_seen_rows, export, seen_ref) if seen_ref else None
        unseen = rows_unseen_by(champion_manifest, test.features, seen_rows)
    if unseen is None:
        return not_fair(
            f"the exported version {pointer.version} records no split rule ptqflow can replay (it was exported "
            "before splits were assigned by content, or without the digests of the rows its given splits trained "
            "on), so the rows of this test split it trained on are unknown and its accuracy here could be inflated",
        )
    needed = gate.comparison_rows_needed(len(test))
    compared = int(unseen.sum())
    if compared < needed:
        return not_fair(
            f"only {compared} of the {len(test)} rows of this test split are provably unseen by the exported version "
            f"{pointer.version} (its split used another seed, fractions or given splits), and a fair comparison "
            f"needs {needed} (--min-comparison-rows)",
            compared_rows=compared,
        )
    features, labels = test.features[unseen], test.labels[unseen]
    refused: list[RowFailure] = []  # samples either model's kernels refuse: compared on the others
    try:
        champion_outputs = predict_tflite(
            champion_model(export, pointer), features, batch_size, inputs=test.inputs, failures=refused
        )
    except (ValueError, RuntimeError) as error:  # e.g. the data's shape changed since it was exported
        return not_fair(
            f"the exported version cannot run on this test split ({str(error).splitlines()[0][:200]}), so the two "
            "cannot be compared",
        )
    challenger_outputs = predict_tflite(
        store.read_bytes(challenger), features, batch_size, inputs=test.inputs, failures=refused
    )
    comparison = (
        f"the {compared} rows of this test split it never trained on"
        if compared < len(test)
        else f"all {compared} rows of this test split, none of which it trained on"
    )
    if refused:
        ran = ~(refused_rows(champion_outputs) | refused_rows(challenger_outputs))
        champion_outputs, challenger_outputs, labels = champion_outputs[ran], challenger_outputs[ran], labels[ran]
        comparison += f", less the {compared - int(ran.sum())} that one of the models refused to run"
        compared = int(ran.sum())
        if compared < needed:
            return not_fair(
                f"only {compared} unseen rows ran on both models (the others' kernels refused them), and a fair "
                f"comparison needs {needed} (--min-comparison-rows)",
                compared_rows=compared,
            )
    if task is ModelTask.regression:
        if champion_outputs.shape != labels.shape:
            return not_fair(
                f"the exported version gives {champion_outputs.shape[1:]} outputs per row for "
                f"{labels.shape[1]} targets, so the two cannot be compared"
            )
        return decide_on_error(
            mean_absolute_error(challenger_outputs, labels),
            gate.promotion_tolerance,
            mean_absolute_error(champion_outputs, labels),
            pointer,
            compared,
            comparison,
        )
    return decide(
        accuracy(challenger_outputs, labels),
        True,
        gate.promotion_tolerance,
        accuracy(champion_outputs, labels),
        pointer,
        compared,
        comparison,
    )

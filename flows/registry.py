"""MLflow: every run as an MLflow run, and the exported champion as a version of a registered model that carries
the ``champion`` alias (``--mlflow-uri``, extra ``ptqflow[mlflow]``).

The export's ``latest.json`` is what devices read, so it stays the truth and the registry follows it. After every
command that can move it (a run, ``promote``, ``rollback``), ``follow_export`` registers the version ``latest.json``
names if the registry lacks it, from the export's own files (each checked against its sha256), and moves the alias
there. The two then name the same champion after every command. A registry that cannot be reached fails the
command after the export has moved, with the one command that brings the registry in line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ptqflow.flows.environment import variables_set
from ptqflow.storage.store import ArtifactRef, ArtifactStore
from ptqflow.tasks.core.errors import PtqflowError, secrets_kept_out
from ptqflow.tasks.core.parameters import DeviceTarget, RegistryParameters
from ptqflow.tasks.release.documents import ExportPointer, same_version
from ptqflow.tasks.release.firmware import DEVICE_EXPORT_FILES
from ptqflow.tasks.release.outcome import RegistryRecord
from ptqflow.tasks.release.promotion import exported_manifest, read_pointer
from ptqflow.tasks.release.publish import export_store, read_exported
from ptqflow.tasks.release.targets import PointerMoved, Release, follow

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION_ALIAS = "champion"
RUN_TAG = "ptqflow.run_id"  # on MLflow runs and model versions: the ptqflow run they belong to
VERSION_TAG = "ptqflow.export_version"
REPORT_FILES = {"report": "report.json", "report_md": "report.md", "report_html": "report.html"}
# What a registered version holds, by the export's labels (the float model's name depends on its format).
REGISTERED_FILES = {
    "tflite": "model.tflite",
    "report": "report.json",
    "report_html": "report.html",
    "manifest": "manifest.json",
}
SAFE_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
TAGGED_FIGURES = ("float_accuracy", "quantized_accuracy", "accuracy_drop_pp", "quantized_mae", "sqnr_db")


class RegistryError(PtqflowError):
    """MLflow cannot be used as given (not installed, not reachable before the run): nothing has run yet."""


class RegistryOutOfLine(Exception):
    """MLflow failed after the export may have moved; the message names the command that brings it in line."""


def registered_model_name(registry: RegistryParameters, dataset: str) -> str:
    """``--registered-model``, or ``ptqflow-`` and the data set's last path part (``s3://b/photos/`` gives
    ``ptqflow-photos``)."""
    if registry.registered_model:
        return registry.registered_model
    stem = re.sub(r"\.(parquet|csv)$", "", dataset.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1])
    return "ptqflow-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "model")


@contextlib.contextmanager
def mlflow_client(tracking_uri: str) -> Iterator[MlflowClient]:
    """A client of ``tracking_uri``. MLflow writes links to stdout, which holds ``--json``'s one object: they go
    to stderr."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise RegistryError("--mlflow-uri needs MLflow: pip install 'ptqflow[mlflow]' (or drop --mlflow-uri)") from None
    with contextlib.redirect_stdout(sys.stderr):
        yield MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _mlflow_run(client: MlflowClient, experiment: str, run_id: str) -> str:
    """The MLflow run of a ptqflow run (found by its tag, else created) in ``experiment``."""
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'", max_results=1)
    if runs:
        return str(runs[0].info.run_id)
    return str(client.create_run(experiment_id, tags={RUN_TAG: run_id}, run_name=run_id[:8]).info.run_id)


def flat_parameters(parameters: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``sampling.dataset``-style keys with string values, as MLflow's params take them."""
    flat: dict[str, str] = {}
    for key, value in parameters.items():
        if isinstance(value, Mapping):
            flat.update(flat_parameters(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def _numbers(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    return {
        f"{prefix}{key}": float(value)
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
    }


def numeric_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A run's figures as MLflow metrics: the run's own, then each device target's (``tflm.arena_bytes``,
    ``npu.ethos-u55-128.sram_bytes``, ...)."""
    figures = _numbers(metrics)
    tflm = metrics.get("tflm")
    if isinstance(tflm, Mapping):
        figures |= _numbers(tflm, "tflm.")
        if isinstance(tflm.get("figures"), Mapping):
            figures |= _numbers(tflm["figures"], "tflm.")
    known = {target.value for target in DeviceTarget if target.npu}
    for npu in metrics.get("npu") or ():
        if isinstance(npu, Mapping) and npu.get("target") in known:  # manifests are not trusted: no other keys
            figures |= _numbers(npu, f"npu.{npu['target']}.")
    return figures


def _log_files(client: MlflowClient, mlflow_run: str, files: Mapping[str, bytes], artifact_path: str) -> None:
    """Log ``files`` (name: content) under ``artifact_path`` of an MLflow run, which takes files from a folder."""
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        client.log_artifacts(mlflow_run, folder, artifact_path)


def log_run(
    client: MlflowClient,
    experiment: str,
    run_id: str,
    status: str,
    parameters: Mapping[str, Any],
    metrics: Mapping[str, Any],
    files: Mapping[str, bytes],
) -> str:
    """Record a ptqflow run as an MLflow run (again, when it is retried: the same values): its parameters, its
    figures, its status and ``files`` (the report) under ``ptqflow/``. Returns the MLflow run id."""
    from mlflow.entities import Metric, Param, RunTag

    mlflow_run = _mlflow_run(client, experiment, run_id)
    now = int(time.time() * 1000)
    client.log_batch(
        mlflow_run,
        metrics=[Metric(key, value, now, 0) for key, value in numeric_figures(metrics).items()],
        params=[Param(key, value[:6000]) for key, value in flat_parameters(parameters).items()],
        tags=[RunTag("ptqflow.status", status)],
    )
    _log_files(client, mlflow_run, files, "ptqflow")
    client.set_terminated(mlflow_run, "FINISHED")
    return mlflow_run


def _model_file(ref: ArtifactRef) -> str:
    return "model.savedmodel.zip" if ref.uri.endswith(".zip") else "model.keras"


@dataclass(frozen=True)
class MlflowRegistry:
    """MLflow's model registry as an export target (``tasks.release.targets``): a version is a version of the
    registered model ``name``, tagged with its ptqflow run and its export version; the champion is the version
    that carries the ``champion`` alias."""

    client: MlflowClient
    name: str

    def champion_version(self) -> Any:
        """The registered model version the alias names (MLflow's record); None when there is none."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, CHAMPION_ALIAS)
        except MlflowException:  # no such alias (or model) yet
            return None

    def version_of_run(self, run_id: str) -> Any:
        """The registered model version of a ptqflow run; None when it was never registered."""
        if not SAFE_RUN_ID.fullmatch(run_id):  # the run id comes from an export, which is not trusted
            raise RegistryError(f"{run_id!r} is not a ptqflow run id: republish with `ptqflow promote`")
        versions = self.client.search_model_versions(f"name = '{self.name}' and tags.`{RUN_TAG}` = '{run_id}'")
        return versions[0] if versions else None

    def read_pointer(self) -> ExportPointer | None:
        champion = self.champion_version()
        return None if champion is None else _pointer_of(champion)

    def publish(self, release: Release) -> ExportPointer:
        """A new version of the registered model from the release's files (the int8 .tflite, the float model, the
        report, the manifest), each read and checked against its sha256 by ``release.read``; the run's version as
        it is when it was registered already."""
        existing = self.version_of_run(release.run_id)
        if existing is not None:
            return _pointer_of(existing)
        exported = release.files
        names = {
            **REGISTERED_FILES,
            **DEVICE_EXPORT_FILES,
            **({"model": _model_file(exported["model"])} if "model" in exported else {}),
        }
        files = {names[label]: release.read(ref) for label, ref in exported.items() if label in names}
        mlflow_run = _mlflow_run(self.client, self.name, release.run_id)
        _log_files(self.client, mlflow_run, files, "model")
        tflite = exported["tflite"]
        figures = numeric_figures(release.manifest.metrics if release.manifest else {})
        tags = {
            RUN_TAG: release.run_id,
            VERSION_TAG: release.version or release.run_id,
            "tflite.sha256": tflite.sha256,
            "tflite.bytes": str(tflite.bytes),
            **{key: f"{figures[key]:.6g}" for key in TAGGED_FIGURES if key in figures},
        }
        artifact_uri = self.client.get_run(mlflow_run).info.artifact_uri
        return _pointer_of(
            self.client.create_model_version(self.name, f"{artifact_uri}/model", run_id=mlflow_run, tags=tags)
        )

    def move_pointer(self, pointer: ExportPointer, replacing: ExportPointer | None) -> None:
        if not same_version(self.read_pointer(), replacing):
            raise PointerMoved(f"MLflow's {self.name}@{CHAMPION_ALIAS} moved meanwhile")
        version = self.version_of_run(pointer.run_id)
        if version is None:
            raise RegistryError(f"run {pointer.run_id} is not registered in {self.name}: publish it first")
        self.client.set_registered_model_alias(self.name, CHAMPION_ALIAS, version.version)


def _pointer_of(model_version: Any) -> ExportPointer:
    """A registered model version as a pointer: its export version and run (from its tags) and its .tflite."""
    tags = dict(model_version.tags or {})
    files = {}
    if "tflite.sha256" in tags and "tflite.bytes" in tags:
        files["tflite"] = ArtifactRef(
            uri=f"{model_version.source}/model.tflite", sha256=tags["tflite.sha256"], bytes=int(tags["tflite.bytes"])
        )
    return ExportPointer(
        version=tags.get(VERSION_TAG, str(model_version.version)), run_id=tags.get(RUN_TAG, ""), files=files
    )


def follow_export(client: MlflowClient, tracking_uri: str, name: str, export: ArtifactStore) -> RegistryRecord:
    """Move ``name``'s champion alias to the version the export's ``latest.json`` names, registering it first if
    the registry lacks it (``tasks.release.targets.follow``). With nothing exported there is no champion: the
    alias is left as it is."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Full-integer TFLite models validated by ptqflow.")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    registry = MlflowRegistry(client, name)
    previous = registry.champion_version()
    record = RegistryRecord(
        tracking_uri=tracking_uri,
        registered_model=name,
        previous_champion_version=previous.version if previous else None,
    )
    pointer = read_pointer(export)
    if pointer is None:
        return record
    if not SAFE_RUN_ID.fullmatch(pointer.run_id):  # the export is not trusted: no filter injection
        raise RegistryError(f"{export.url}'s latest.json names no valid run id: republish with `ptqflow promote`")
    champion = Release(
        run_id=pointer.run_id,
        files=pointer.files,
        read=functools.partial(read_exported, export),
        manifest=exported_manifest(export, pointer),
        version=pointer.version,
    )
    follow(champion, registry)
    version = registry.version_of_run(pointer.run_id)
    return record.model_copy(update={"champion_version": str(version.version), "champion_run_id": pointer.run_id})


def in_line_again(registry: RegistryParameters, name: str, export: str | None, run_id: str) -> str:
    """The command that brings the registry in line with the export after it could not be reached."""
    if export:
        return (
            f"run `ptqflow sync-registry --export {export} --mlflow-uri {registry.mlflow_uri} --registered-model "
            f"{name}`"
        )
    return f"rerun (the run's stages are reused) to record run {run_id}"


@task(name="record_in_mlflow", cache_policy=NO_CACHE, persist_result=False)
@secrets_kept_out()
def record_in_mlflow(
    store_url: str,
    registry: RegistryParameters,
    name: str,
    run_id: str,
    status: str,
    parameters: dict[str, Any],
    metrics: dict[str, Any],
    artifacts: dict[str, ArtifactRef],
    export_url: str | None,
) -> RegistryRecord:
    """Log the run to MLflow; with an export, bring the registry's champion in line with ``latest.json``."""
    assert registry.mlflow_uri is not None
    store = ArtifactStore(store_url)
    files = {REPORT_FILES[label]: store.read_bytes(ref) for label, ref in artifacts.items() if label in REPORT_FILES}
    with mlflow_client(registry.mlflow_uri) as client:
        mlflow_run = log_run(client, name, run_id, status, parameters, metrics, files)
        if export_url is None:
            return RegistryRecord(tracking_uri=registry.mlflow_uri, registered_model=name, mlflow_run_id=mlflow_run)
        record = follow_export(client, registry.mlflow_uri, name, export_store(export_url))
    return record.model_copy(update={"mlflow_run_id": mlflow_run})


@contextlib.contextmanager
def quick_requests() -> Iterator[None]:
    """MLflow retries a request for minutes by default (right for a rate-limited server during a run); asking
    whether it answers at all takes one try of at most 15 s."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    with variables_set(quick):
        yield


def check_reachable(registry: RegistryParameters) -> None:
    """Before a run: MLflow is installed and answers at ``--mlflow-uri``."""
    if registry.mlflow_uri is None:
        return
    try:
        with quick_requests(), mlflow_client(registry.mlflow_uri) as client:
            client.search_experiments(max_results=1)
    except RegistryError:
        raise
    except Exception as error:
        first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise RegistryError(
            f"MLflow at {registry.mlflow_uri} does not answer ({first}): start it or correct --mlflow-uri"
        ) from None


def out_of_line(error: Exception, registry: RegistryParameters, name: str, export: str | None, run_id: str) -> str:
    """One line for a registry that failed after a run: what the export holds and how to bring MLflow in line."""
    first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    where = f"the export {export} is as the run left it; " if export else ""
    return (
        f"MLflow at {registry.mlflow_uri} failed while recording run {run_id} ({type(error).__name__}: {first}): "
        f"{where}once it answers, {in_line_again(registry, name, export, run_id)}"
    )


def name_for_export(registry: RegistryParameters, export: ArtifactStore) -> str:
    """``--registered-model``, or the name the champion's own run used (from its exported manifest)."""
    if registry.registered_model:
        return registry.registered_model
    pointer = read_pointer(export)
    manifest = exported_manifest(export, pointer) if pointer else None
    if manifest is None or manifest.dataset is None:
        raise RegistryError(
            f"{export.url} holds no exported run to name the registered model by: pass --registered-model"
        )
    return registered_model_name(registry, manifest.dataset)


def sync_with_export(registry: RegistryParameters, export: ArtifactStore) -> RegistryRecord:
    """Bring the registry's champion in line with the export's latest.json (after promote, rollback, or a run whose
    registry could not be reached)."""
    assert registry.mlflow_uri is not None
    name = name_for_export(registry, export)
    with mlflow_client(registry.mlflow_uri) as client:
        return follow_export(client, registry.mlflow_uri, name, export)

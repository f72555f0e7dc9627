"""The Prefect events ptqflow emits, so that automations can react to a run (start a device roll-out when a model
is promoted, page someone when the gate fails) and a new data set can start one (``ptqflow.data.arrived``).

Each event's resource is the quantized model (``ptqflow.model.<sha256>``); the data set and the export are related
resources, and inside a flow run Prefect relates the flow run, its flow and its deployment too. Payloads hold
only what the run's summary shows (figures, versions, URIs; a signed URL is held redacted, as everywhere): never
credentials. Emitting is best effort: a run never fails because an event could not be sent.
"""

from __future__ import annotations

import logging
from typing import Any

from ptqflow.storage.store import ArtifactRef
from ptqflow.tasks.release.documents import ExportPointer
from ptqflow.tasks.release.outcome import RunSummary, SweepSummary
from ptqflow.tasks.release.publish import ExportRecord

GATE_PASSED = "ptqflow.gate.passed"
GATE_FAILED = "ptqflow.gate.failed"
MODEL_PROMOTED = "ptqflow.model.promoted"
MODEL_NOT_PROMOTED = "ptqflow.model.not-promoted"
EXPORT_ROLLED_BACK = "ptqflow.export.rolled-back"
DATA_ARRIVED = "ptqflow.data.arrived"  # emitted by the data's owner (docs/scheduling.md); `serve --on-event`

logger = logging.getLogger("ptqflow.events")


def model_resource(model: ArtifactRef, name: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"ptqflow.model.{model.sha256}",
        "prefect.resource.name": name,
        "ptqflow.sha256": model.sha256,
        "ptqflow.uri": model.uri,
    }


def _related(dataset: str | None, export: str | None) -> list[dict[str, str]]:
    related = []
    if dataset:
        related.append({"prefect.resource.id": f"ptqflow.dataset.{dataset}", "prefect.resource.role": "dataset"})
    if export:
        related.append({"prefect.resource.id": f"ptqflow.export.{export}", "prefect.resource.role": "export"})
    return related


def _emit(event: str, resource: dict[str, str], related: list[dict[str, str]], payload: dict[str, Any]) -> None:
    from prefect.events import emit_event

    try:
        emit_event(event=event, resource=resource, related=related, payload=payload)
    except Exception as error:  # best effort: the run's outcome is recorded whatever the event client does
        logger.warning("could not emit the event %s: %s", event, error)


def _export_payload(export: ExportRecord | None) -> dict[str, Any] | None:
    if export is None:
        return None
    return {
        "url": export.url,
        "version": export.version,
        "pointer": export.pointer,
        "model": export.files["tflite"].uri if "tflite" in export.files else None,
        "published": export.published,
    }


def emit_run_events(summary: RunSummary | SweepSummary, dataset: str | None, export: str | None) -> None:
    """After a run: the gate's verdict, then (with an export) whether the model was promoted."""
    model = summary.artifacts.get("tflite")
    if model is None:  # a sweep in which nothing passed has no model to name
        resource = {"prefect.resource.id": f"ptqflow.run.{summary.run_id}", "prefect.resource.name": "ptqflow run"}
    else:
        resource = model_resource(model, f"quantized model of run {summary.run_id}")
    metrics = summary.metrics.model_dump(mode="json", exclude={"worst_layers"}) if summary.metrics else None
    common = {"run_id": summary.run_id, "manifest": summary.manifest, "dataset": dataset, "metrics": metrics}
    related = _related(dataset, export)
    _emit(
        GATE_PASSED if summary.gate.passed else GATE_FAILED,
        resource,
        related,
        {**common, "status": summary.gate.status.value, "message": summary.gate.message},
    )
    if summary.promotion is not None:
        _emit(
            MODEL_PROMOTED if summary.promotion.promote else MODEL_NOT_PROMOTED,
            resource,
            related,
            {
                **common,
                "message": summary.promotion.message,
                "promotion": summary.promotion.model_dump(mode="json"),
                "export": _export_payload(summary.export),
            },
        )


def emit_pointer_moved(
    event: str, export: str, version: str, previous: str | None, pointer: ExportPointer | None
) -> None:
    """After ``promote`` or ``rollback`` by hand (outside a flow run): the model ``latest.json`` now names is the
    resource. Only to a Prefect server that outlives the command (PREFECT_API_URL), and sent before it returns."""
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value() or pointer is None:
        return
    resource = model_resource(pointer.files["tflite"], f"exported version {version}")
    _emit(
        event,
        resource,
        _related(None, export),
        {"run_id": pointer.run_id, "version": version, "previous_version": previous, "by": "hand"},
    )
    EventsWorker.drain_all(timeout=10)

"""The events and progress artifacts a run leaves on the session's real Prefect server, and an automation that
reacts to one of its events."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from conftest import ptqflow_events, wait_for

pytestmark = pytest.mark.slow


def test_runs_promotions_and_rollbacks_emit_events_an_automation_can_react_to(cli, prefect_server, tmp_path):
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
        DeploymentFilter,
        DeploymentFilterId,
    )
    from prefect.events import EventTrigger, Posture, RunDeployment

    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    with get_client(sync_client=True) as client:
        # A device roll-out deployment, and an automation that starts it whenever a model is promoted.
        flow_id = client.create_flow_from_name(f"roll-out-{uuid.uuid4().hex[:8]}")
        roll_out = client.create_deployment(flow_id=flow_id, name="devices")
    automation = Automation(
        name=f"roll out promoted models {uuid.uuid4().hex[:8]}",
        trigger=EventTrigger(expect={"ptqflow.model.promoted"}, posture=Posture.Reactive, threshold=1),
        actions=[RunDeployment(source="selected", deployment_id=roll_out)],
    ).create()
    try:
        store, export = str(tmp_path / "store"), str(tmp_path / "export")
        first = cli("run", "--epochs", "2", "--store", store, "--export", export, "--json")
        assert first.returncode == 0, first.stderr[-3000:]
        summary = json.loads(first.stdout)
        model_id = f"ptqflow.model.{summary['artifacts']['tflite']['sha256']}"

        with get_client(sync_client=True) as client:
            runs = wait_for(
                lambda: client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[roll_out]))
                )
            )
            assert runs, "the automation did not start the roll-out deployment"
            # Both events of this run: the automation may fire before the server has stored the second one.
            events = wait_for(
                lambda: [e for e in ptqflow_events(client, since) if e.payload.get("run_id") == summary["run_id"]], 2
            )
        names = [e.event for e in events]
        assert names == ["ptqflow.gate.passed", "ptqflow.model.promoted"]
        assert all(e.resource.id == model_id for e in events)
        gate, promoted = events
        assert gate.payload["run_id"] == summary["run_id"] and gate.payload["status"] == "passed"
        assert gate.payload["metrics"]["quantized_accuracy"] == summary["metrics"]["quantized_accuracy"]
        assert promoted.payload["export"]["version"] == summary["export"]["version"]
        related = {r.role: r.id for r in promoted.related}
        assert related["dataset"] == "ptqflow.dataset.digits" and related["export"] == f"ptqflow.export.{export}"
        assert related["flow-run"] == f"prefect.flow-run.{summary['run_id']}"  # Prefect relates the run itself

        # A run started from the UI shows how far its long stages are: one progress artifact each, at 100% now.
        with get_client(sync_client=True) as client:
            progress = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    type=ArtifactFilterType(any_=["progress"]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[summary["run_id"]]),
                )
            )
        assert {a.key: a.data for a in progress} == {
            "ptq-progress-train-float-model": 100.0,
            "ptq-progress-convert-to-tflite": 100.0,
            "ptq-progress-validate-with-interpreter": 100.0,
        }

        # A second model, promoted by hand, then rolled back: each move of latest.json is an event.
        second = json.loads(cli("run", "--epochs", "3", "--seed", "1", "--store", store, "--json").stdout)
        assert cli("promote", second["run_id"], "--store", store, "--export", export).returncode == 0
        assert cli("rollback", "--export", export).returncode == 0
        with get_client(sync_client=True) as client:
            moved = wait_for(lambda: [e for e in ptqflow_events(client, since) if by_hand_to(e, export)], 2)
        assert [e.event for e in moved] == ["ptqflow.model.promoted", "ptqflow.export.rolled-back"]
        assert moved[0].resource.id == f"ptqflow.model.{second['artifacts']['tflite']['sha256']}"
        assert moved[1].resource.id == model_id and moved[1].payload["version"] == summary["export"]["version"]
    finally:
        automation.delete()


def by_hand_to(event, export: str) -> bool:
    """A promote or rollback by hand of this test's export (other tests may move their own exports meanwhile)."""
    return event.payload.get("by") == "hand" and any(r.id == f"ptqflow.export.{export}" for r in event.related)

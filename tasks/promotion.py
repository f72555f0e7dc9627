"""Champion and challenger: a new model reaches ``latest.json`` only if it is no worse than the one devices have.

Before a run publishes, the model ``latest.json`` points to (the champion) is read back from the export, checked
against its recorded sha256, and evaluated on the new run's test split with the LiteRT Interpreter, exactly like
the new model (the challenger). The challenger is promoted when it passed its own gate and its accuracy is at most
``promotion_tolerance`` percentage points below the champion's.

By hand: ``promote`` points ``latest.json`` at a run (publishing it first if it never was), ``rollback`` at the
version published before the current one. Every pointer ever written stays in ``history/``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from storage.store import ArtifactRef, ArtifactStore, StoreError, safe_key
from storage.tables import read_parquet
from tasks.artifacts import SampledDataset
from tasks.publish import POINTER, export_store, publish_run, read_verified, verify_copy
from tasks.report import render_html, render_markdown
from tasks.validate import accuracy, predict_tflite


class PromotionDecision(BaseModel):
    """Whether a run's model replaces the exported one, with both figures on the same test split."""

    promote: bool
    message: str
    challenger_accuracy: float | None
    champion_accuracy: float | None = None
    champion_version: str | None = None
    champion_run_id: str | None = None
    tolerance_pp: float = Field(description="How many pp below the champion the challenger may be.")


def decide(challenger_accuracy: float | None, gate_passed: bool, tolerance_pp: float,
           champion_accuracy: float | None = None, champion: dict[str, Any] | None = None) -> PromotionDecision:
    """Pure: the promotion rule."""
    figures = {
        "challenger_accuracy": challenger_accuracy, "champion_accuracy": champion_accuracy,
        "champion_version": (champion or {}).get("version"), "champion_run_id": (champion or {}).get("run_id"),
        "tolerance_pp": tolerance_pp,
    }
    if not gate_passed or challenger_accuracy is None:
        return PromotionDecision(promote=False, message="not promoted: the model did not pass its own gate", **figures)
    if champion is None:
        return PromotionDecision(promote=True, message="promoted: there is no exported model yet", **figures)
    gap_pp = round((champion_accuracy - challenger_accuracy) * 100, 6)
    versus = (f"{challenger_accuracy:.2%} against {champion_accuracy:.2%} for the exported version "
              f"{champion['version']}")
    if gap_pp > tolerance_pp:
        return PromotionDecision(
            promote=False, **figures,
            message=f"not promoted: accuracy {versus} on this test split, {gap_pp:.2f} pp worse (tolerance "
            f"{tolerance_pp} pp); the exported model stays (`ptqflow promote RUN_ID` overrides)",
        )
    return PromotionDecision(promote=True, message=f"promoted: accuracy {versus} on this test split", **figures)


def read_pointer(export: ArtifactStore) -> dict[str, Any] | None:
    return json.loads(export.read_named(POINTER)) if export.exists_named(POINTER) else None


def champion_model(export: ArtifactStore, pointer: dict[str, Any]) -> bytes:
    """The exported model ``pointer`` names, checked against its recorded sha256."""
    ref = pointer["files"]["tflite"]
    return read_verified(export, export.key_of(ref["uri"]), ref["sha256"], ref["bytes"])


@task(name="compare_with_champion", cache_policy=NO_CACHE, persist_result=False)
def compare_with_champion(
    store_url: str, export_url: str, dataset: SampledDataset, challenger_accuracy: float, tolerance_pp: float,
    batch_size: int = 256,
) -> PromotionDecision:
    """Evaluate the champion on this run's test split, where validation measured the challenger
    (``challenger_accuracy``, a model that passed its gate); decide. Never cached: the champion changes under it."""
    export = export_store(export_url)
    pointer = read_pointer(export)
    if pointer is None:
        return decide(challenger_accuracy, True, tolerance_pp)
    with ArtifactStore(store_url).open(dataset.test) as f:
        test = read_parquet(f)
    try:
        champion_outputs = predict_tflite(champion_model(export, pointer), test.features, batch_size)
    except (ValueError, RuntimeError) as error:  # e.g. the data's shape changed since it was exported
        return PromotionDecision(
            promote=False, challenger_accuracy=challenger_accuracy, champion_version=pointer["version"],
            champion_run_id=pointer.get("run_id"), tolerance_pp=tolerance_pp,
            message=f"not promoted: the exported version {pointer['version']} cannot run on this test split "
            f"({str(error).splitlines()[0][:200]}), so the two cannot be compared; `ptqflow promote RUN_ID` replaces it",
        )
    return decide(challenger_accuracy, True, tolerance_pp, accuracy(champion_outputs, test.labels), pointer)


@task(name="record_promotion_in_report", cache_policy=NO_CACHE, persist_result=False)
def record_promotion_in_report(
    store_url: str, report: ArtifactRef, promotion: PromotionDecision
) -> dict[str, ArtifactRef]:
    """The validation report with this run's decision in it, as new report.json, .md and .html blobs. The
    validation's own report stays as it was: it is cached per model, and the same model may be judged against
    another champion in another run."""
    store = ArtifactStore(store_url)
    document = {**json.loads(store.read_bytes(report)), "promotion": promotion.model_dump(mode="json")}
    return {
        "report": store.put_json(document),
        "report_md": store.put_bytes(render_markdown(document).encode(), ".md"),
        "report_html": store.put_bytes(render_html(document).encode(), ".html"),
    }


class PointerMove(BaseModel):
    version: str
    previous_version: str | None
    pointer: str
    history: str


def _versions(export: ArtifactStore) -> list[str]:
    return sorted({key.split("/")[1] for key in export.list_named("versions") if key.count("/") >= 1})


def point_latest_to(export: ArtifactStore, version: str, action: str) -> PointerMove:
    """Verify every file of ``version`` against what was recorded when it was published, then write a new
    pointer to it: into ``history/`` (never overwritten) first, then ``latest.json``."""
    recorded_key = f"history/{version}.json"
    if not export.exists_named(recorded_key):
        raise StoreError(f"no published version {version!r} in {export.url}: `ptqflow runs` lists the runs")
    recorded = json.loads(export.read_named(recorded_key))
    files = {name: verify_copy(export, export.key_of(ref["uri"]), ref["sha256"], ref["bytes"])
             for name, ref in recorded["files"].items()}
    previous = read_pointer(export)
    now = datetime.now(timezone.utc)
    pointer = json.dumps(
        {
            "kind": "ptqflow.export_pointer", "version": version, "run_id": recorded["run_id"],
            "published_at": recorded["published_at"], "pointed_at": now.isoformat(timespec="seconds"),
            "action": action, "files": {name: ref.model_dump() for name, ref in files.items()},
        },
        indent=2, sort_keys=True,
    ).encode() + b"\n"
    history = safe_key(f"history/{now:%Y%m%dT%H%M%S%fZ}-{action}-{version}.json")
    export.write_named(history, pointer, exclusive=True)
    export.write_named(POINTER, pointer)
    return PointerMove(version=version, previous_version=previous["version"] if previous else None,
                       pointer=export.uri_for(POINTER), history=export.uri_for(history))


def version_of_run(export: ArtifactStore, run_id: str) -> str | None:
    return next((v for v in _versions(export) if v.endswith(f"-{run_id}")), None)


def rollback(export: ArtifactStore) -> PointerMove:
    """Point ``latest.json`` at the version published before the current one."""
    current = read_pointer(export)
    if current is None:
        raise StoreError(f"nothing to roll back: {export.url} has no {POINTER}")
    # Only versions whose publish completed (a pointer was recorded); a folder left by an interrupted publish is not.
    earlier = [v for v in _versions(export) if v < current["version"] and export.exists_named(f"history/{v}.json")]
    if not earlier:
        raise StoreError(f"nothing to roll back to: {current['version']} is the first version in {export.url}")
    return point_latest_to(export, earlier[-1], "rollback")


def promote(store: ArtifactStore, export: ArtifactStore, manifest: dict[str, Any]) -> PointerMove:
    """Point ``latest.json`` at the run of ``manifest``, publishing it first if it never was. Only a run that
    passed its own gate can be promoted."""
    if manifest.get("status") != "passed":
        raise StoreError(
            f"run {manifest['run_id']} did not pass its gate ({manifest['gate']['message']}): only a passing run can "
            "be promoted"
        )
    version = version_of_run(export, manifest["run_id"])
    if version is None:
        previous = read_pointer(export)
        artifacts = {name: ArtifactRef(**ref) for name, ref in manifest["artifacts"].items()}
        published = publish_run(store, export, manifest["run_id"], artifacts, manifest)
        if published.published:
            return PointerMove(version=published.version, previous_version=previous["version"] if previous else None,
                               pointer=published.pointer, history=export.uri_for(f"history/{published.version}.json"))
        version = published.version  # its model files are already a published version's
    return point_latest_to(export, version, "promote")

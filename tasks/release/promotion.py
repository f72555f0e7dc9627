"""Champion and challenger: a new model reaches ``latest.json`` only if it is no worse than the one devices have.

Before a run publishes, the model ``latest.json`` points to (the champion) is read back from the export, checked
against its recorded sha256, and evaluated with the LiteRT Interpreter beside the new model (the challenger) on the
rows of the new run's test split that the champion never trained on: those its own split rule (recorded in its
run manifest: scheme, seed, fractions) put in its test split, or, when its splits were the source's own, those
whose digests are not among the train and validation rows it exported (``seen_rows.parquet``). A row's hash split
depends only on its content (see ``tasks.data.sampling.hash_split``), so with the same seed and fractions that is the
whole test split, however the data grew; with another seed it is the rows both runs held out. When fewer rows than
``min_comparison_rows`` remain, or the champion's rule is unknown (exported before that rule existed), the
comparison cannot be fair and the new model is not promoted automatically. The challenger is promoted when it
passed its own gate and its accuracy on those rows is at most ``promotion_tolerance`` percentage points below the
champion's. For regression the two are compared on their MAE (the tolerance is then in percent of the champion's);
unlabeled data has no labels to compare two models on, so a model that passed its own gate is promoted.

By hand: ``promote`` points ``latest.json`` at a run (publishing it first if it never was), ``rollback`` at the
version published before the current one. Every pointer ever written stays in ``history/``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
from pydantic import BaseModel, ValidationError

from ptqflow.storage.store import ArtifactRef, ArtifactStore, ConcurrentUpdate, StoreError, safe_key
from ptqflow.tasks.core.validation_report import PromotionDecision
from ptqflow.tasks.data.sampling import GIVEN_SCHEME, SPLIT_SCHEME, read_seen_rows, row_digests, split_positions
from ptqflow.tasks.evaluation.metrics import increase_pct
from ptqflow.tasks.release.documents import ExportPointer, RunManifest
from ptqflow.tasks.release.publish import (
    POINTER,
    MalformedRecord,
    current_pointer,
    exported_key,
    move_pointer,
    parse_pointer,
    pointer_files,
    publish_run,
    read_exported,
    verify_copy,
)
from ptqflow.tasks.release.targets import PointerMoved


def decide(
    challenger_accuracy: float | None,
    gate_passed: bool,
    tolerance_pp: float,
    champion_accuracy: float | None = None,
    champion: ExportPointer | None = None,
    compared_rows: int | None = None,
    comparison: str | None = None,
) -> PromotionDecision:
    """Pure: the promotion rule."""
    figures = {
        "challenger_accuracy": challenger_accuracy,
        "champion_accuracy": champion_accuracy,
        "champion_version": champion.version if champion else None,
        "champion_run_id": champion.run_id if champion else None,
        "tolerance_pp": tolerance_pp,
        "compared_rows": compared_rows,
        "comparison": comparison,
    }
    if not gate_passed or challenger_accuracy is None:
        return PromotionDecision(promote=False, message="not promoted: the model did not pass its own gate", **figures)
    if champion is None:
        return PromotionDecision(promote=True, message="promoted: there is no exported model yet", **figures)
    if champion_accuracy is None:
        raise ValueError("an exported model to compare with needs its accuracy on the compared rows")
    gap_pp = round((champion_accuracy - challenger_accuracy) * 100, 6)
    versus = (
        f"{challenger_accuracy:.2%} against {champion_accuracy:.2%} for the exported version "
        f"{champion.version} on {comparison}"
    )
    if gap_pp > tolerance_pp:
        return PromotionDecision(
            promote=False,
            **figures,
            message=f"not promoted: accuracy {versus}, {gap_pp:.2f} pp worse (tolerance {tolerance_pp} pp); the "
            "exported model stays (`ptqflow promote RUN_ID` overrides)",
        )
    return PromotionDecision(promote=True, message=f"promoted: accuracy {versus}", **figures)


def decide_on_error(
    challenger_mae: float,
    tolerance_pct: float,
    champion_mae: float,
    champion: ExportPointer,
    compared_rows: int,
    comparison: str,
) -> PromotionDecision:
    """Pure: the promotion rule for regression, on the MAE of both models on the same rows: promoted when the
    challenger's is at most ``tolerance_pct`` percent above the champion's."""
    figures = {
        "metric": "mae",
        "challenger_accuracy": None,
        "challenger_mae": challenger_mae,
        "champion_mae": champion_mae,
        "champion_version": champion.version,
        "champion_run_id": champion.run_id,
        "tolerance_pp": tolerance_pct,
        "compared_rows": compared_rows,
        "comparison": comparison,
    }
    rise = increase_pct(champion_mae, challenger_mae)
    versus = (
        f"MAE {challenger_mae:.4g} against {champion_mae:.4g} for the exported version {champion.version} on "
        f"{comparison}"
    )
    if rise > tolerance_pct:
        return PromotionDecision(
            promote=False,
            **figures,
            message=f"not promoted: {versus}, {rise:.2f}% worse (tolerance {tolerance_pct}%); the exported model "
            "stays (`ptqflow promote RUN_ID` overrides)",
        )
    return PromotionDecision(promote=True, message=f"promoted: {versus}", **figures)


def promoted_without_labels(pointer: ExportPointer | None, tolerance: float) -> PromotionDecision:
    """Unlabeled data: there are no labels to compare two models on; a model that passed its own gate against its
    own float model replaces the exported one."""
    replaced = f"; it replaces the exported version {pointer.version}" if pointer else ""
    return PromotionDecision(
        promote=True,
        metric="none",
        challenger_accuracy=None,
        champion_version=pointer.version if pointer else None,
        champion_run_id=pointer.run_id if pointer else None,
        tolerance_pp=tolerance,
        message="promoted: unlabeled data has no labels to compare it with the exported model on, and it passed its "
        f"own gate against its float model{replaced}",
    )


def not_comparable(
    challenger_figure: float | None,
    pointer: ExportPointer,
    tolerance_pp: float,
    why: str,
    compared_rows: int | None = None,
    metric: str = "accuracy",
) -> PromotionDecision:
    """The decision when the champion cannot be measured fairly here: keep it, and say why and how to override."""
    return PromotionDecision(
        promote=False,
        metric=metric,
        challenger_accuracy=challenger_figure if metric == "accuracy" else None,
        challenger_mae=challenger_figure if metric == "mae" else None,
        champion_version=pointer.version,
        champion_run_id=pointer.run_id,
        tolerance_pp=tolerance_pp,
        compared_rows=compared_rows,
        message=f"not promoted automatically: {why}; the exported version {pointer.version} stays "
        "(`ptqflow promote RUN_ID` replaces it)",
    )


def rows_unseen_by(
    champion_manifest: RunManifest, test_features: np.ndarray, seen_rows: Callable[[], np.ndarray] | None = None
) -> np.ndarray | None:
    """Which test rows the champion never trained or validated on: those its own split rule (``split`` in its run
    manifest) held out as its test rows, or, when its splits were the source's own, those whose digests are not
    among its ``seen_rows`` (read only then); None when neither can tell."""
    rule = champion_manifest.split
    if rule is None:
        return None
    if rule.scheme == SPLIT_SCHEME and rule.seed is not None and rule.test_fraction is not None:
        return split_positions(test_features, rule.seed) < rule.test_fraction
    if rule.scheme == GIVEN_SCHEME and seen_rows is not None:
        return ~np.isin(row_digests(test_features), seen_rows())
    return None


def exported_seen_rows(export: ArtifactStore, ref: ArtifactRef) -> np.ndarray:
    return read_seen_rows(read_exported(export, ref))


def exported_manifest(export: ArtifactStore, pointer: ExportPointer) -> RunManifest | None:
    """The run manifest exported beside the champion; None when there is none or it is not one (a version
    exported before manifests were, or a damaged file: its split cannot be replayed)."""
    ref = pointer.files.get("manifest")
    if ref is None:
        return None
    try:
        return RunManifest.model_validate_json(read_exported(export, ref))
    except ValidationError:
        return None


def read_pointer(export: ArtifactStore) -> ExportPointer | None:
    """``latest.json``, or None when there is none.

    Raises:
        MalformedRecord: a damaged ``latest.json``, naming the commands that write a new one.
    """
    pointer, raw = current_pointer(export)
    if pointer is None and raw is not None:
        parse_pointer(raw, export.uri_for(POINTER))  # raises, saying what is wrong
    return pointer


def champion_model(export: ArtifactStore, pointer: ExportPointer) -> bytes:
    """The exported model ``pointer`` names, checked against its recorded sha256."""
    return read_exported(export, pointer.files["tflite"])


class PointerMove(BaseModel):
    version: str
    previous_version: str | None
    pointer: str
    history: str


def _versions(export: ArtifactStore) -> list[str]:
    return sorted({key.split("/")[1] for key in export.list_named("versions") if key.count("/") >= 1})


def _recorded(export: ArtifactStore, version: str) -> ExportPointer | None:
    """The pointer recorded when ``version`` was published and went live; None if it never did, or if its record
    is damaged (such a version is not followed: a damaged record cannot say what to check its files against)."""
    key = f"history/{version}.json"
    if not export.exists_named(key):
        return None
    try:
        return parse_pointer(export.read_named(key), export.uri_for(key))
    except MalformedRecord:
        return None


def point_latest_to(export: ArtifactStore, version: str, action: str) -> PointerMove:
    """Verify every file of ``version`` against what was recorded when it was published, then point
    ``latest.json`` at it and record the new pointer in ``history/`` (never overwritten). A damaged ``latest.json``
    is replaced: this is how it is repaired."""
    recorded = _recorded(export, version)
    if recorded is None:
        raise StoreError(
            f"no published version {version!r} in {export.url} (never live, or its record history/{version}.json "
            "is damaged): `ptqflow runs` lists the runs; `ptqflow promote --run-id RUN` publishes one again"
        )
    files = {
        name: verify_copy(export, exported_key(export, ref.uri), ref.sha256, ref.bytes)
        for name, ref in recorded.files.items()
    }
    previous, previous_bytes = current_pointer(export)
    now = datetime.now(timezone.utc)
    history = safe_key(f"history/{now:%Y%m%dT%H%M%S%fZ}-{action}-{version}.json")
    pointer = ExportPointer(
        version=version,
        run_id=recorded.run_id,
        published_at=recorded.published_at,
        pointed_at=now.isoformat(timespec="seconds"),
        action=action,
        history=history,
        files=pointer_files(files, export),
    )
    try:
        move_pointer(export, pointer.to_bytes(), history, previous_bytes)
    except ConcurrentUpdate as error:
        raise PointerMoved(f"{error}: nothing was changed; look at `ptqflow runs`, then retry") from None
    return PointerMove(
        version=version,
        previous_version=previous.version if previous else None,
        pointer=export.uri_for(POINTER),
        history=export.uri_for(history),
    )


def version_of_run(export: ArtifactStore, run_id: str) -> str | None:
    return next((v for v in _versions(export) if v.endswith(f"-{run_id}")), None)


def rollback(export: ArtifactStore) -> PointerMove:
    """Point ``latest.json`` at the version that was live before the current one: the newest earlier version
    recorded in ``history/`` (a version folder that never went live, or whose record is damaged, is passed over)."""
    current = read_pointer(export)
    if current is None:
        raise StoreError(f"nothing to roll back: {export.url} has no {POINTER}")
    earlier = [v for v in _versions(export) if v < current.version and _recorded(export, v) is not None]
    if not earlier:
        raise StoreError(f"nothing to roll back to: {current.version} is the first live version in {export.url}")
    return point_latest_to(export, earlier[-1], "rollback")


def promote(store: ArtifactStore, export: ArtifactStore, manifest: RunManifest) -> PointerMove:
    """Point ``latest.json`` at the run of ``manifest``, publishing it first if it never was. Only a run that
    passed its own gate can be promoted."""
    if not manifest.passed:
        gate = manifest.gate.message if manifest.gate else "no gate recorded"
        raise StoreError(f"run {manifest.run_id} did not pass its gate ({gate}): only a passing run can be promoted")
    version = version_of_run(export, manifest.run_id)
    if version is None or _recorded(export, version) is None:  # never, or not completely, published
        previous, _ = current_pointer(export)
        published = publish_run(store, export, manifest.run_id, manifest.artifacts, manifest)
        if published.published:
            return PointerMove(
                version=published.version,
                previous_version=previous.version if previous else None,
                pointer=published.pointer,
                history=export.uri_for(f"history/{published.version}.json"),
            )
        version = published.version  # its model files are already a published version's
    return point_latest_to(export, version, "promote")

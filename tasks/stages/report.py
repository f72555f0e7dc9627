"""The reports for people, rendered from the typed documents the stages stored: report.md and report.html from the
validation's report.json (with the promotion decision, when a run made one), and the sweep's table and plot.

Rendering is a step of its own, run on every run and never cached: no cached stage imports a view, so a change to
how a report looks changes no stage's cache key and reruns nothing but this (``tests/tasks/core/test_caching.py``)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from ptqflow.storage.store import ArtifactRef, ArtifactStore
from ptqflow.tasks.core.errors import secrets_kept_out
from ptqflow.tasks.core.validation_report import PromotionDecision, ValidationReport
from ptqflow.tasks.sweep.ranking import SweepReport, SweepRow
from ptqflow.tasks.views.render import render_html, render_markdown
from ptqflow.tasks.views.sweep_plot import render_sweep_plot


class ReportFiles(BaseModel):
    """The validation report's files."""

    model_config = ConfigDict(frozen=True)

    report: ArtifactRef = Field(description="report.json: the validation's document (with the promotion, if any).")
    report_md: ArtifactRef = Field(description="report.md, the same report for people.")
    report_html: ArtifactRef = Field(description="report.html, self-contained with its PNG plots.")

    def artifacts(self) -> dict[str, ArtifactRef]:
        """The files by the names runs record them under."""
        return {"report": self.report, "report_md": self.report_md, "report_html": self.report_html}


@task(name="write_report", cache_policy=NO_CACHE, persist_result=False)
@secrets_kept_out()
def write_report(store_url: str, report: ArtifactRef, promotion: PromotionDecision | None = None) -> ReportFiles:
    """report.md and report.html from the validation's report.json. With ``promotion``, a new report.json that
    records this run's decision first: the validation's own stays as it was, since it is cached per model and the
    same model may be judged against another champion in another run."""
    store = ArtifactStore(store_url)
    document = ValidationReport.model_validate(store.read_json(report))
    if promotion is not None:
        document = document.model_copy(update={"promotion": promotion})
        report = store.put_json(document.model_dump(mode="json"))
    return ReportFiles(
        report=report,
        report_md=store.put_bytes(render_markdown(document).encode(), ".md"),
        report_html=store.put_bytes(render_html(document).encode(), ".html"),
    )


@task(name="write_sweep_report", cache_policy=NO_CACHE, persist_result=False)
@secrets_kept_out()
def write_sweep_report(store_url: str, document: dict[str, Any], markdown: str) -> SweepReport:
    """Write the ranked table (JSON and Markdown) and the plot to the store."""
    store = ArtifactStore(store_url)
    rows = [SweepRow.model_validate(row) for row in document["rows"]]
    return SweepReport(
        table=store.put_json(document),
        markdown=store.put_bytes(markdown.encode(), ".md"),
        plot=store.put_bytes(render_sweep_plot(rows), ".png"),
    )

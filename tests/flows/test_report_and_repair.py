"""The validation report and repair, end to end: a model built to quantize badly, --ops builtins, a Prefect test
server, and the HTML report opened in a real (headless) browser."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from conftest import write_outlier_model
from ptqflow.storage.store import ArtifactStore
from ptqflow.tasks.core.parameters import ConversionParameters, TargetOps, TrainingParameters
from ptqflow.tasks.evaluation.interpreter import audit_tensor_types

pytestmark = [pytest.mark.slow, pytest.mark.smoke]


@pytest.fixture(scope="module")
def repaired_run(prefect_server, tmp_path_factory, trained_digits_model):
    from ptqflow.flows.pipeline import ptq_pipeline

    folder = tmp_path_factory.mktemp("repair")
    model_file = folder / "outlier.keras"
    write_outlier_model(trained_digits_model, model_file)  # only its dense layer collapses under int8
    store = str(folder / "store")
    summary = ptq_pipeline(
        store=store,
        training=TrainingParameters(model_url=str(model_file)),
        conversion=ConversionParameters(ops=TargetOps.builtins),
        export=str(folder / "export"),
    )
    return summary, ArtifactStore(store), folder


def test_repair_brings_the_outlier_model_back_within_the_gate(repaired_run):
    summary, store, _ = repaired_run
    assert summary.status == "passed" and summary.gate.passed
    assert summary.gate.message.startswith("accuracy gate passed after repair")
    assert list(summary.tasks)[-2:] == ["repair_quantization", "validate_repaired_model"]
    assert summary.repair is not None
    assert summary.repair.succeeded and summary.repair.float_layers == ("dense", "probabilities")
    assert summary.metrics.accuracy_drop_pp <= 1.0
    unrepaired = audit_tensor_types(store.read_bytes(summary.artifacts["tflite_unrepaired"]))
    repaired = audit_tensor_types(store.read_bytes(summary.artifacts["tflite"]))
    assert unrepaired.full_integer and not repaired.full_integer
    assert {o.op for o in repaired.float_ops} >= {"FULLY_CONNECTED"}


def test_the_report_names_the_offending_layer_and_what_repair_cost(repaired_run):
    summary, store, _ = repaired_run
    report = store.read_json(summary.artifacts["report"])
    metrics = report["metrics"]
    assert metrics["layers"][0]["layer"] == "dense" and metrics["layers"][0]["typical_steps"] < 1
    assert metrics["repair"]["repaired_bytes"] > metrics["repair"]["unrepaired_bytes"]
    assert metrics["repair"]["repaired_latency_ms_p50"] > 0 and metrics["repair"]["unrepaired_latency_ms_p50"] > 0
    assert set(metrics["models"]) == {"float_keras", "float_tflite", "quantized_tflite"}
    markdown = store.read_bytes(summary.artifacts["report_md"]).decode()
    assert "| dense | FULLY_CONNECTED |" in markdown and "## Repair" in markdown
    # dense is the offender by construction, far ahead of the next layer: not a call another processor could flip.
    assert "Ranking margin: dense (FULLY_CONNECTED) is" in markdown and "close call" not in markdown


def test_the_report_is_in_the_export(repaired_run):
    summary, _, folder = repaired_run
    files = summary.export.files
    assert {"report.json", "report.md", "report.html"} <= {ref.uri.rsplit("/", 1)[-1] for ref in files.values()}


def test_the_summary_and_a_link_to_the_report_are_prefect_artifacts(repaired_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    summary, _, _ = repaired_run

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[summary.run_id]))
            )

    by_key = {a.key: a for a in asyncio.run(artifacts())}
    assert {"ptq-summary", "ptq-report"} <= set(by_key)
    # Prefect keeps a link artifact as markdown: [text](url).
    assert f"({summary.artifacts['report_html'].uri})" in by_key["ptq-report"].data
    assert "Worst layers: dense" in by_key["ptq-summary"].data


def test_the_html_report_opens_in_a_browser_with_its_plots(repaired_run):
    from playwright.sync_api import sync_playwright

    summary, _, folder = repaired_run
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed (apt-get install chromium; .ci/run installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(summary.artifacts["report_html"].uri)
            loaded = page.eval_on_selector_all("img", "images => images.map(i => i.complete && i.naturalWidth)")
            # accuracy per model, per-layer error, live tensor memory per operator, confusion matrices
            assert len(loaded) == 4 and all(width > 100 for width in loaded)
            assert "dense" in page.inner_text("table:nth-of-type(2)")
            page.screenshot(path=str(folder / "report.png"), full_page=True)
        finally:
            browser.close()
    assert (folder / "report.png").stat().st_size > 10_000

"""Deployments against the session's real Prefect server: a served flow triggered through the REST API as the UI
does it, a schedule that the server runs by itself, prefect.yaml with a process worker, and the UI itself in a
headless browser ("Run" -> "Custom run")."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import prefect_executable, ptqflow_executable, stop_process_group

# Runs here train and convert under whatever load the machine has: deadlines are generous, and so is the limit.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "tests" / ".artifacts"  # kept after the session (git-ignored)
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def api(prefect_server: str) -> httpx.Client:
    """An HTTP client of the server's REST API that, like Prefect's own clients and the UI's users, retries what
    a busy server answers with 429/502/503 (SQLite is locked for a moment while another process writes)."""
    from prefect.client.base import PrefectHttpxSyncClient

    return PrefectHttpxSyncClient(base_url=prefect_server, timeout=30, raise_on_all_errors=False)


def deployment_id(prefect_server: str, flow_and_name: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    with api(prefect_server) as client:
        while time.monotonic() < deadline:
            response = client.get(f"/deployments/name/{flow_and_name}")
            if response.status_code == 200:
                return response.json()["id"]
            time.sleep(1)
    raise AssertionError(f"deployment {flow_and_name} never appeared")


def wait_for_run(prefect_server: str, run_id: str, timeout: float = 480) -> dict:
    deadline = time.monotonic() + timeout
    with api(prefect_server) as client:
        while time.monotonic() < deadline:
            run = client.get(f"/flow_runs/{run_id}").json()
            if run["state"]["type"] in TERMINAL:
                return run
            time.sleep(1)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout} s")


def deployment_runs(client: httpx.Client, deployment: str) -> list[dict]:
    return client.post("/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment]}}}).json()


def manifests(store: Path) -> list[dict]:
    return (
        [json.loads(p.read_text()) for p in sorted((store / "runs").glob("*.json"))]
        if (store / "runs").exists()
        else []
    )


def serve(prefect_server: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    return subprocess.Popen(
        [ptqflow_executable(), "serve", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory):
    store = tmp_path_factory.mktemp("served") / "store"
    process = serve(
        prefect_server,
        *("--name", "served", "--store", str(store), "--epochs", "4", "--cron", "0 2 * * *"),
        *("--on-event", "ptqflow.data.arrived"),
    )
    try:
        yield deployment_id(prefect_server, "ptq-pipeline/served"), store
    finally:
        stop_process_group(process, signal.SIGINT)  # Ctrl-C: serve stops its runner cleanly


def test_a_run_triggered_as_the_ui_does_completes_with_its_artifacts(prefect_server, served):
    deployment, store = served
    with api(prefect_server) as client:
        defaults = client.get(f"/deployments/{deployment}").json()["parameters"]
        assert defaults["training"]["epochs"] == 4 and defaults["store"] == str(store)
        # The UI's custom-run form posts every parameter, with the user's changes.
        parameters = {**defaults, "calibration": {**defaults["calibration"], "calibration_size": 150}}
        response = client.post(f"/deployments/{deployment}/create_flow_run", json={"parameters": parameters})
        assert response.status_code == 201, response.text
        run = wait_for_run(prefect_server, response.json()["id"])
        assert run["state"]["type"] == "COMPLETED", run["state"]["message"]
        keys = {
            a["key"]
            for a in client.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
        }
    assert {"ptq-summary", "ptq-report"} <= keys
    [manifest] = [m for m in manifests(store) if m["run_id"] == run["id"]]
    assert manifest["parameters"]["calibration"]["calibration_size"] == 150
    assert manifest["gate"]["passed"]
    for artifact in manifest["artifacts"].values():
        assert Path(artifact["uri"].removeprefix("file://")).stat().st_size == artifact["bytes"]


def test_data_announced_by_an_event_starts_a_run_of_the_served_flow(prefect_server, served):
    deployment, store = served
    with api(prefect_server) as client:
        before = {run["id"] for run in deployment_runs(client, deployment)}
    announce = [prefect_executable(), "event", "emit", "ptqflow.data.arrived"]
    announce += ["--resource-id", "ptqflow.dataset.digits"]
    subprocess.run(announce, env={**os.environ, "PREFECT_API_URL": prefect_server}, check=True, capture_output=True)
    deadline, started = time.monotonic() + 120, []
    with api(prefect_server) as client:
        while not started and time.monotonic() < deadline:
            started = [run for run in deployment_runs(client, deployment) if run["id"] not in before]
            time.sleep(1)
    assert started, "the event trigger started no run"
    assert wait_for_run(prefect_server, started[0]["id"])["state"]["type"] == "COMPLETED"


def test_invalid_parameters_are_refused_when_the_run_is_triggered(prefect_server, served):
    deployment, _ = served
    with api(prefect_server) as client:
        response = client.post(
            f"/deployments/{deployment}/create_flow_run", json={"parameters": {"calibration": {"calibration_size": -5}}}
        )
        assert response.status_code == 409
        assert "calibration.calibration_size" in response.json()["detail"]
        assert "-5 is less than the minimum of 1" in response.json()["detail"]
        response = client.post(
            f"/deployments/{deployment}/create_flow_run", json={"parameters": {"conversion": {"ops": "everything"}}}
        )
        assert response.status_code == 409 and "conversion.ops" in response.json()["detail"]


def test_a_form_run_outside_the_workers_locations_or_models_fails_before_touching_anything(
    prefect_server, served, tmp_path
):
    """The form user is not trusted: locations outside the roots of their role the deployment was served with,
    home paths, names relative to the worker's folder, other credentials blocks, and model functions outside
    PTQFLOW_ALLOWED_MODELS, fail the run at once, naming the setting (flows/trust.py)."""
    deployment, _ = served
    outside = tmp_path / "outside"
    with api(prefect_server) as client:
        defaults = client.get(f"/deployments/{deployment}").json()["parameters"]

        def section(name: str, **changes: str) -> dict:
            return {name: {**defaults[name], **changes}}

        # label: (the form's changes, what the refusal must name)
        cases = {
            "store": ({"store": str(outside / "store")}, ("store", "PTQFLOW_STORE_ROOTS")),
            "export": ({"export": f"file://{outside}/export"}, ("export", "PTQFLOW_EXPORT_ROOTS")),
            "sampling.dataset": (
                section("sampling", dataset="https://example.invalid/data.parquet"),
                ("sampling.dataset", "PTQFLOW_DATA_ROOTS"),
            ),
            "training.model_url": (
                section("training", model_url=str(outside / "model.keras")),
                ("training.model_url", "PTQFLOW_MODEL_ROOTS"),
            ),
            "calibration.calibration_source": (
                section("calibration", calibration_source=str(outside / "calibration.parquet")),
                ("calibration.calibration_source", "PTQFLOW_DATA_ROOTS"),
            ),
            "training.model": (section("training", model="os:system"), ("training.model", "PTQFLOW_ALLOWED_MODELS")),
            # The worker's home: a bare "~" has no "/", and once passed every check that looked for one.
            "store in the home": ({"store": "~"}, ("store '~' is a home path",)),
            "export in the home": ({"export": "~"}, ("export '~' is a home path",)),
            "a store beside the worker": ({"store": "ptqflow-store"}, ("relative to the worker's folder",)),
            "a credentials block": ({"storage_block": "aws-credentials/admin"}, ("PTQFLOW_ALLOWED_BLOCKS",)),
        }
        written_in_home = ("blobs", "runs", "prefect-results", "versions", "history", "latest.json")
        assert not any((Path.home() / name).exists() for name in written_in_home)
        created = {}
        for name, (changes, _) in cases.items():
            response = client.post(
                f"/deployments/{deployment}/create_flow_run", json={"parameters": {**defaults, **changes}}
            )
            assert response.status_code == 201, response.text
            created[name] = response.json()["id"]
    for name, run_id in created.items():
        run = wait_for_run(prefect_server, run_id)
        message = run["state"]["message"] or ""
        assert run["state"]["type"] == "FAILED", (name, run["state"])
        assert "RefusedParameter" in message and all(part in message for part in cases[name][1]), (name, message)
    assert not any((Path.home() / name).exists() for name in written_in_home)  # nothing written in the home
    assert not outside.exists()  # nothing was read or written there


BUSY_RETRIES = 3  # submissions again after the server answers 503 (busy), as a user would


@dataclass
class PageEvidence:
    """What a page showed and what the API answered it: the reasons a form that did not act gives nowhere else."""

    sent: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    toasts: set[str] = field(default_factory=set)
    stale_toasts: set[str] = field(default_factory=set)  # an earlier submission's, still on show while they fade

    @classmethod
    def watching(cls, page) -> PageEvidence:
        evidence = cls()
        page.on("request", lambda r: r.method != "GET" and evidence.sent.append(f"{r.method} {r.url}"))
        page.on("requestfailed", lambda r: evidence.errors.append(f"request failed: {r.method} {r.url} {r.failure}"))
        page.on("response", evidence._answered)
        page.on("console", lambda m: m.type == "error" and evidence.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: evidence.errors.append(f"page: {e}"))
        return evidence

    def _answered(self, response) -> None:
        request = response.request
        if request.method == "GET" and response.status < 400:
            return
        summary = f"{request.method} {response.url.split('/api', 1)[-1]} -> {response.status}"
        if response.status >= 400 or response.url.endswith("/ui/schemas/validate"):
            try:
                summary += f" {response.text()[:500]}"
            except Exception as error:  # the body can be gone once the page navigates
                summary += f" (body unreadable: {error})"
        self.answers.append(summary)

    def submitted(self, since: int) -> bool:
        """The form sent something after the first ``since`` requests: it validates, then creates the run."""
        return any("/ui/schemas/validate" in r or "/create_flow_run" in r for r in self.sent[since:])

    def look(self, page) -> None:
        """Keep the toasts on show: they fade after a few seconds. An error toast has the error icon."""
        for card in page.locator(".p-toast__card").all():
            with contextlib.suppress(Exception):  # a toast can fade between listing and reading it
                text = " ".join(card.inner_text(timeout=1000).split())
                error = card.locator(".p-toast__icon--error").count() > 0
                toast = f"error: {text}" if error else text
                if toast not in self.stale_toasts:
                    self.toasts.add(toast)

    def submitting_again(self) -> None:
        """The toasts on show belong to the submission before: a later failure shows in the API's answers."""
        self.stale_toasts |= self.toasts
        self.toasts.clear()

    def busy_answers(self) -> int:
        """How many times the server answered the run's creation 503: Prefect's server answers so for errors a client
        can retry (a database lock on a loaded machine); its own client retries them, its UI leaves it to the user."""
        return sum("/create_flow_run -> 503" in answer for answer in self.answers)

    def refused(self, retries_left: bool) -> bool:
        """The form gave up: an error toast, the server found the values invalid, or it refused to create the run
        (a 503 counts only once no submission again is left)."""
        creations = [a for a in self.answers if "/create_flow_run -> " in a]
        last_status = int(creations[-1].split(" -> ", 1)[1].split()[0]) if creations else None
        refused_creation = last_status is not None and last_status >= 400 and (last_status != 503 or not retries_left)
        return (
            any(t.startswith("error: ") for t in self.toasts)
            or any('"valid":false' in a.replace(" ", "") for a in self.answers)
            or refused_creation
        )

    def describe(self, page) -> str:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / "ui-custom-run-failed.png"
        page.screenshot(path=str(shot), full_page=True)
        invalid = page.locator(".p-label__message--failed, .p-message--error").all_inner_texts()
        return (
            f"url {page.url}; toasts {sorted(self.toasts)}; invalid fields {invalid}; "
            f"API answers {self.answers[-12:]}; errors {self.errors[-8:]}; screenshot {shot}"
        )


def test_custom_run_from_the_prefect_ui_in_a_browser(prefect_server, served):
    from playwright.sync_api import expect, sync_playwright

    deployment, store = served
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed (apt-get install chromium; .ci/run installs it)"
    ui = prefect_server.removesuffix("/api")
    # Every wait is on what the page shows or what the API holds, with deadlines that a loaded machine meets:
    # the UI's own calls (schema validation, run creation) are slow when the cores are busy.
    ui_deadline_ms = 180_000
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(ui_deadline_ms)
            evidence = PageEvidence.watching(page)
            page.goto(f"{ui}/deployments/deployment/{deployment}")
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run").click()
            page.wait_for_url(re.compile(rf"/deployments/deployment/{deployment}/run"))
            calibration_size = page.locator(
                "xpath=//span[starts-with(normalize-space(.), 'Calibration Size')]"
                "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')][1]"
                "//input"
            )
            expect(calibration_size).to_have_value("200", timeout=ui_deadline_ms)  # loaded with the defaults
            calibration_size.fill("120")
            expect(calibration_size).to_have_value("120")
            with api(prefect_server) as client:
                before = {r["id"] for r in deployment_runs(client, deployment)}
                submit = page.get_by_role("button", name="Submit")
                expect(submit).to_be_enabled()
                sent_before = len(evidence.sent)
                submit.click()
                # A click the page does not act on leaves no other trace: as a user would, click again when the
                # form sent nothing at all.
                clicked = time.monotonic()
                while not evidence.submitted(sent_before) and time.monotonic() < clicked + 30:
                    page.wait_for_timeout(500)  # Playwright's own wait: the page's events are handled meanwhile
                if not evidence.submitted(sent_before):
                    evidence.errors.append("the first Submit click sent nothing; clicked again")
                    submit.click()
                # The form validates the values on the server, then creates the run; what it does either way shows
                # on the page (an invalid field, a toast that fades after a few seconds) or in the API's answers,
                # so all of it is watched while waiting for the run to appear.
                deadline = time.monotonic() + ui_deadline_ms / 1000

                def is_new(run: dict) -> bool:  # not one the scheduler adds to the cron's upcoming runs meanwhile
                    return run["id"] not in before and not run["auto_scheduled"]

                retried = 0
                while not (new := [r for r in deployment_runs(client, deployment) if is_new(r)]):
                    evidence.look(page)
                    if evidence.busy_answers() > retried and retried < BUSY_RETRIES:
                        # The server was busy, not refusing: as a user would, submit again once its toast is read.
                        retried += 1
                        evidence.errors.append(f"the server was busy (503); submitted again ({retried})")
                        page.wait_for_timeout(2000)
                        evidence.look(page)
                        evidence.submitting_again()
                        submit.click()
                        continue
                    if time.monotonic() > deadline or evidence.refused(retries_left=retried < BUSY_RETRIES):
                        raise AssertionError(f"the form did not create a run: {evidence.describe(page)}")
                    page.wait_for_timeout(1000)
            # Having created it, the UI goes back to the deployment's page.
            page.wait_for_url(re.compile(rf"/deployments/deployment/{deployment}(\?|$)"), timeout=60_000)
            [run] = new
            run_id = run["id"]
            page.goto(f"{ui}/runs/flow-run/{run_id}")
            # The state badge in the run's heading (not a log line that says "Completed"), updated live.
            expect(page.locator(".page-heading .state-badge").first).to_have_text("Completed", timeout=480_000)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "ui-custom-run-completed.png"))
        finally:
            browser.close()
    assert (SCREENSHOTS / "ui-custom-run-completed.png").stat().st_size > 10_000
    run = wait_for_run(prefect_server, run_id, timeout=60)
    assert run["state"]["type"] == "COMPLETED" and run["parameters"]["calibration"]["calibration_size"] == 120
    assert any(m["run_id"] == run_id for m in manifests(store))


def test_a_schedule_runs_by_itself_and_promotes_the_model_trained_on_new_data(prefect_server, tmp_path):
    """Served every 20 s on a Parquet folder that grows: the scheduler's runs are cache hits while nothing changes;
    after new rows arrive, the retrained model is compared with the exported one on test rows that one never
    trained on (the whole new test split: a row's split never changes) and replaces it."""
    import numpy as np

    from ptqflow.storage.tables import write_parquet_bytes
    from ptqflow.tasks.data.datasets import load_dataset

    digits = load_dataset("digits")
    data, store, export = tmp_path / "data", tmp_path / "store", tmp_path / "export"
    data.mkdir()

    def add_part(name: str, rows: np.ndarray) -> None:
        staged = data / f".{name}.staged"  # not *.parquet: a run listing the folder never sees it half-written
        staged.write_bytes(write_parquet_bytes(digits.take(rows)))
        os.replace(staged, data / f"{name}.parquet")

    add_part("part-0", np.arange(1200))
    log = tmp_path / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                ptqflow_executable(),
                "serve",
                "--name",
                "every-20s",
                "--store",
                str(store),
                "--dataset",
                str(data),
                "--export",
                str(export),
                "--epochs",
                "3",
                "--promotion-tolerance",
                "3",
                "--interval",
                "20",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_for(condition, what: str) -> list[dict]:
        # A cold run trains, converts and validates: about a minute idle, several under a parallel CPU load.
        deadline = time.monotonic() + 600
        runs: list[dict] = []
        with api(prefect_server) as client:
            while time.monotonic() < deadline:
                runs = client.post(
                    "/flow_runs/filter",
                    json={
                        "flow_runs": {"deployment_id": {"any_": [deployment]}},
                        "sort": "EXPECTED_START_TIME_ASC",
                        "limit": 50,
                    },
                ).json()
                failed = [r for r in runs if r["state"]["type"] in TERMINAL - {"COMPLETED"}]
                assert not failed, failed[0]["state"]["message"]
                if condition(runs):
                    return runs
                time.sleep(2)
        states = [(r["expected_start_time"], r["state"]["name"]) for r in runs[:8]]
        raise AssertionError(
            f"{what} within 10 minutes; runs: {states}; serve log: {log.read_text()[-3000:]} "
            "(the server's scheduler logs to PREFECT_HOME/server.log)"
        )

    def completed(runs: list[dict]) -> list[dict]:
        return [r for r in runs if r["state"]["type"] == "COMPLETED"]

    try:
        deployment = deployment_id(prefect_server, "ptq-pipeline/every-20s")
        before = completed(wait_for(lambda runs: len(completed(runs)) >= 2, "no two completed runs"))
        add_part("part-1", np.arange(1200, len(digits)))  # the night's new rows
        grown_after = {r["id"] for r in before}

        def retrained(runs: list[dict]) -> bool:
            done = {r["id"] for r in completed(runs)} - grown_after
            return any(not m["tasks"]["sample_dataset"]["cached"] for m in manifests(store) if m["run_id"] in done)

        wait_for(retrained, "no run retrained on the new rows")
    finally:
        stop_process_group(process, signal.SIGINT)
    assert all("auto-scheduled" in r["tags"] for r in before)  # made by the server's scheduler, not by us
    by_time = sorted(manifests(store), key=lambda m: m["created_at"])
    first, unchanged = by_time[0], by_time[1]
    assert not all(t["cached"] for t in first["tasks"].values()) and first["promotion"]["promote"]
    # The source did not change: the next scheduled run is all cache hits and publishes nothing new.
    assert all(t["cached"] for t in unchanged["tasks"].values()), unchanged["tasks"]
    [grown] = [m for m in by_time if m["run_id"] not in grown_after and not m["tasks"]["sample_dataset"]["cached"]][:1]
    decision = grown["promotion"]
    dataset = json.loads(Path(grown["artifacts"]["dataset"]["uri"].removeprefix("file://")).read_text())
    assert decision["compared_rows"] == dataset["splits"]["test"]["samples"]  # all of it: unseen by the champion
    assert decision["promote"], decision["message"]
    assert json.loads((export / "latest.json").read_text())["run_id"] == grown["run_id"]


def test_prefect_yaml_deploys_and_a_process_worker_runs_it(prefect_server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PWD": str(ROOT)}
    prefect = prefect_executable()
    subprocess.run(
        [prefect, "work-pool", "create", "ptqflow-process", "--type", "process"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        check=False,
    )  # already there on a rerun: fine
    deployed = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    deployment = deployment_id(prefect_server, "ptq-pipeline/nightly", timeout=10)
    store = tmp_path / "store"
    with api(prefect_server) as client:
        described = client.get(f"/deployments/{deployment}").json()
        assert [s["schedule"]["cron"] for s in described["schedules"]] == ["0 2 * * *"]
        assert described["work_pool_name"] == "ptqflow-process" and described["enforce_parameter_schema"]
        assert described["global_concurrency_limit"]["limit"] == 1
        parameters = {**described["parameters"], "store": str(store), "training": {"epochs": 3}}
        response = client.post(f"/deployments/{deployment}/create_flow_run", json={"parameters": parameters})
        assert response.status_code == 201, response.text
    # The run's store is outside the deployment's own (./ptqflow-store): the worker allows it as a store root
    # (flows/trust.py).
    worker_env = {**env, "PTQFLOW_STORE_ROOTS": str(tmp_path)}
    worker = subprocess.run(
        [prefect, "worker", "start", "--pool", "ptqflow-process", "--run-once"],
        env=worker_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    run = wait_for_run(prefect_server, response.json()["id"], timeout=60)
    assert run["state"]["type"] == "COMPLETED", worker.stdout[-3000:] + worker.stderr[-3000:]
    assert [m["run_id"] for m in manifests(store)] == [run["id"]]

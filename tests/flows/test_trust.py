"""What a deployment run may name (flows/trust.py): pure checks, no server."""

from __future__ import annotations

import pytest

from ptqflow.flows.trust import (
    ALLOWED_BLOCKS_ENV,
    ALLOWED_MODELS_ENV,
    ALLOWED_REGISTERED_MODELS_ENV,
    ROLELESS_ROOTS_ENV,
    ROOTS_ENV,
    TRACKING_URI_ENV,
    RefusedParameter,
    check_run_parameters,
    location_parameters,
)

SERVED_WITH = {"store": "/srv/ptqflow/store", "export": "s3://models/digits", "sampling": {"dataset": "digits"}}


def run(**changes) -> dict:
    return {
        "store": "/srv/ptqflow/store",
        "export": None,
        "sampling": {"dataset": "digits"},
        "training": {"model": "auto", "model_url": None},
        "calibration": {"calibration_source": None},
    } | changes


@pytest.fixture(autouse=True)
def no_worker_settings(monkeypatch):
    for setting in (*ROOTS_ENV.values(), ROLELESS_ROOTS_ENV, ALLOWED_BLOCKS_ENV, ALLOWED_REGISTERED_MODELS_ENV):
        monkeypatch.delenv(setting, raising=False)


def test_the_locations_a_deployment_was_created_with_and_what_lies_under_them_are_allowed():
    check_run_parameters(run(), SERVED_WITH)
    check_run_parameters(run(export="s3://models/digits/candidates", sampling={"dataset": "mnist"}), SERVED_WITH)


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"store": "/srv/ptqflow/store2"}, "store file:///srv/ptqflow/store2 is outside the store"),  # not a folder
        ({"store": "/srv/ptqflow/store/../../etc"}, "contains '..'"),
        ({"export": "s3://attacker/bucket"}, "export s3://attacker/bucket is outside"),
        ({"sampling": {"dataset": "https://example.invalid/x.parquet"}}, "sampling.dataset https://example.invalid"),
        ({"training": {"model": "auto", "model_url": "file:///home/someone/model.keras"}}, "training.model_url"),
        ({"calibration": {"calibration_source": "s3://other/cal.parquet"}}, "calibration.calibration_source"),
    ],
)
def test_a_location_outside_the_roots_is_refused_naming_the_setting(changes, refusal):
    with pytest.raises(RefusedParameter, match=refusal.replace("(", r"\(").replace(".", r"\.")) as error:
        check_run_parameters(run(**changes), SERVED_WITH)
    assert "_ROOTS" in str(error.value) or "'..'" in str(error.value)


def test_the_workers_roots_of_each_role_replace_the_default(monkeypatch):
    monkeypatch.setenv(ROOTS_ENV["store"], "/scratch")
    monkeypatch.setenv(ROOTS_ENV["export"], "s3://data/ptq/")
    check_run_parameters(run(store="/scratch/store", export="s3://data/ptq/export"), SERVED_WITH)
    with pytest.raises(RefusedParameter, match="store file:///srv/ptqflow/store2 is outside the store locations"):
        check_run_parameters(run(store="/srv/ptqflow/store2"), SERVED_WITH)
    with pytest.raises(RefusedParameter, match=f"store file:///tmp/x is outside .*{ROOTS_ENV['store']}"):
        check_run_parameters(run(store="/tmp/x"), SERVED_WITH)


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"store": "~"}, "store '~' is a home path"),
        ({"export": "~/exports"}, "export '~/exports' is a home path"),
        ({"store": "store"}, "store 'store' is relative to the worker's folder"),
        ({"export": "./out"}, "export './out' is relative to the worker's folder"),
        ({"sampling": {"dataset": "photos"}}, "sampling.dataset 'photos' is neither a built-in data set"),
        ({"store": "simplecache::s3://bucket/x"}, "chains URLs"),
    ],
)
def test_home_paths_bare_names_and_chained_urls_are_refused(changes, refusal):
    with pytest.raises(RefusedParameter, match=refusal):
        check_run_parameters(run(**changes), SERVED_WITH)


def test_a_role_is_kept_a_written_location_may_not_be_a_read_root_or_reach_one(monkeypatch, tmp_path):
    data = tmp_path / "data"
    served = {**SERVED_WITH, "store": str(tmp_path / "store"), "sampling": {"dataset": str(data / "digits.parquet")}}
    # The data folder is only read: the store (a write) may not go there, even where its root would allow it.
    monkeypatch.setenv(ROOTS_ENV["store"], str(tmp_path))
    with pytest.raises(RefusedParameter, match="store file://.*/data overlaps a location this deployment reads"):
        check_run_parameters(run(store=str(data), sampling=served["sampling"]), served)
    with pytest.raises(RefusedParameter, match="export .* is outside the export locations"):
        check_run_parameters(run(store=str(tmp_path / "store"), export=str(tmp_path / "store" / "x")), served)


def test_a_symbolic_link_inside_a_root_cannot_lead_outside_it(tmp_path):
    root, outside = tmp_path / "stores", tmp_path / "elsewhere"
    root.mkdir(), outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    served = {**SERVED_WITH, "store": str(root)}
    check_run_parameters(run(store=str(root / "team-a")), served)
    with pytest.raises(RefusedParameter, match=f"store file://{outside}/x is outside the store locations"):
        check_run_parameters(run(store=str(root / "link" / "x")), served)


def test_the_roleless_setting_is_refused_naming_the_settings_that_replace_it(monkeypatch):
    monkeypatch.setenv(ROLELESS_ROOTS_ENV, "s3://data/")
    with pytest.raises(RefusedParameter, match="PTQFLOW_ALLOWED_ROOTS does not say .*PTQFLOW_STORE_ROOTS"):
        check_run_parameters(run(), SERVED_WITH)


def test_every_url_field_of_the_parameters_has_a_role():
    """A new field naming a location must be marked (parameters.LOCATION_ROLE), or the trust check skips it."""
    from ptqflow.flows.trust import SECTIONS

    marked = {path for path in location_parameters() if len(path) == 2}
    named_like_locations = {
        (section, name)
        for section, model in SECTIONS.items()
        for name in model.model_fields
        if name.endswith(("_url", "_source", "dataset"))
    }
    assert named_like_locations <= marked
    assert marked == {("sampling", "dataset"), ("training", "model_url"), ("calibration", "calibration_source")}


def test_credential_blocks_and_registered_models_are_the_deployments_own_or_allowed(monkeypatch):
    served = {**SERVED_WITH, "storage_block": "s3-bucket/team", "registry": {"mlflow_uri": "http://mlflow:5000"}}
    check_run_parameters(run(storage_block="s3-bucket/team"), served)
    with pytest.raises(RefusedParameter, match=f"storage_block 's3-bucket/other' is not allowed.*{ALLOWED_BLOCKS_ENV}"):
        check_run_parameters(run(storage_block="s3-bucket/other"), served)
    with pytest.raises(RefusedParameter, match="export_block 'aws-credentials/admin'"):
        check_run_parameters(run(export_block="aws-credentials/admin"), served)
    monkeypatch.setenv(ALLOWED_BLOCKS_ENV, "s3-bucket/other")
    check_run_parameters(run(storage_block="s3-bucket/other"), served)

    tracked = {"mlflow_uri": "http://mlflow:5000"}
    check_run_parameters(run(registry=tracked), served)  # ptqflow-digits, as the deployment's own
    with pytest.raises(RefusedParameter, match=f"registered_model 'fraud-detector'.*{ALLOWED_REGISTERED_MODELS_ENV}"):
        check_run_parameters(run(registry={**tracked, "registered_model": "fraud-detector"}), served)
    monkeypatch.setenv(ALLOWED_REGISTERED_MODELS_ENV, "fraud-detector")
    check_run_parameters(run(registry={**tracked, "registered_model": "fraud-detector"}), served)


def test_model_functions_need_the_workers_allowlist(monkeypatch):
    monkeypatch.delenv(ALLOWED_MODELS_ENV, raising=False)
    for builtin in ("auto", "cnn", "mlp"):
        check_run_parameters(run(training={"model": builtin, "model_url": None}), SERVED_WITH)
    with pytest.raises(RefusedParameter, match=f"training.model 'os:system' is not allowed.*{ALLOWED_MODELS_ENV}"):
        check_run_parameters(run(training={"model": "os:system", "model_url": None}), SERVED_WITH)
    monkeypatch.setenv(ALLOWED_MODELS_ENV, "mypackage.models:small_cnn")
    check_run_parameters(run(training={"model": "mypackage.models:small_cnn", "model_url": None}), SERVED_WITH)


def test_an_mlflow_server_must_be_the_deployments_own_or_the_workers(monkeypatch):
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    served = {**SERVED_WITH, "registry": {"mlflow_uri": "http://mlflow.internal:5000"}}
    check_run_parameters(run(registry={"mlflow_uri": "http://mlflow.internal:5000"}), served)
    check_run_parameters(run(registry={"mlflow_uri": None}), served)  # not recording is always allowed
    with pytest.raises(RefusedParameter, match=f"registry.mlflow_uri 'http://attacker:5000'.*{TRACKING_URI_ENV}"):
        check_run_parameters(run(registry={"mlflow_uri": "http://attacker:5000"}), served)
    with pytest.raises(RefusedParameter, match=r"\(none\)"):  # a deployment served without MLflow
        check_run_parameters(run(registry={"mlflow_uri": "http://mlflow.internal:5000"}), SERVED_WITH)
    monkeypatch.setenv(TRACKING_URI_ENV, "http://mlflow.internal:5000")
    check_run_parameters(run(registry={"mlflow_uri": "http://mlflow.internal:5000"}), SERVED_WITH)

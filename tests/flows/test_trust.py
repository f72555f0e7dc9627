"""What a deployment run may name (flows/trust.py): pure checks, no server."""

from __future__ import annotations

import pytest

from ptqflow.flows.trust import (
    ALLOWED_MODELS_ENV,
    ALLOWED_ROOTS_ENV,
    TRACKING_URI_ENV,
    RefusedParameter,
    check_run_parameters,
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


def test_the_locations_a_deployment_was_created_with_and_what_lies_under_them_are_allowed(monkeypatch):
    monkeypatch.delenv(ALLOWED_ROOTS_ENV, raising=False)
    check_run_parameters(run(), SERVED_WITH)
    check_run_parameters(run(export="s3://models/digits/candidates", sampling={"dataset": "mnist"}), SERVED_WITH)


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"store": "/srv/ptqflow/store2"}, "store file:///srv/ptqflow/store2 is outside"),  # a prefix, not a folder
        ({"store": "/srv/ptqflow/store/../../etc"}, "contains '..'"),
        ({"export": "s3://attacker/bucket"}, "export s3://attacker/bucket is outside"),
        ({"sampling": {"dataset": "https://example.invalid/x.parquet"}}, "sampling.dataset https://example.invalid"),
        ({"training": {"model": "auto", "model_url": "file:///home/someone/model.keras"}}, "training.model_url"),
        ({"calibration": {"calibration_source": "s3://other/cal.parquet"}}, "calibration.calibration_source"),
    ],
)
def test_a_location_outside_the_roots_is_refused_naming_the_setting(monkeypatch, changes, refusal):
    monkeypatch.delenv(ALLOWED_ROOTS_ENV, raising=False)
    with pytest.raises(RefusedParameter, match=refusal.replace("(", r"\(").replace(".", r"\.")) as error:
        check_run_parameters(run(**changes), SERVED_WITH)
    assert ALLOWED_ROOTS_ENV in str(error.value) or "'..'" in str(error.value)


def test_the_workers_roots_replace_the_default(monkeypatch):
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, "s3://data/ptq/, /scratch")
    check_run_parameters(run(store="/scratch/store", export="s3://data/ptq/export"), SERVED_WITH)
    with pytest.raises(RefusedParameter, match="store file:///srv/ptqflow/store is outside"):
        check_run_parameters(run(), SERVED_WITH)


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

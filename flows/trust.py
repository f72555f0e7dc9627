"""The trust boundary of a deployment: what a run triggered from the Prefect UI's form (or its API) may name.

Whoever runs the CLI is trusted: it is their machine and their credentials. A deployment's form is not: anyone
allowed to trigger the deployment fills it in, and the run executes on a worker with the worker's credentials.
So a run of a deployment accepts:

* store, export, data set, model and calibration URLs only under the roots configured on the worker,
  ``PTQFLOW_ALLOWED_ROOTS`` (URL prefixes separated by commas or whitespace); without it, the locations the
  deployment was created with (its saved default parameters, which trigger rights cannot change);
* model functions (``module:function``) only from ``PTQFLOW_ALLOWED_MODELS`` on the worker, besides the
  built-in models: importing a module runs its code;
* an MLflow tracking URI only if it is the deployment's own (its saved parameters) or the worker's
  ``MLFLOW_TRACKING_URI``: a run sends its models and reports there.

A refused parameter fails the run before anything is read or written, naming the setting that would allow it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ptqflow.storage.store import StoreError, canonical_url

ALLOWED_ROOTS_ENV = "PTQFLOW_ALLOWED_ROOTS"
ALLOWED_MODELS_ENV = "PTQFLOW_ALLOWED_MODELS"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
BUILTIN_MODELS = frozenset({"auto", "cnn", "mlp"})
# Where each URL parameter sits in the flow's parameters (the same names in the form and in the CLI's JSON).
URL_PARAMETERS = (
    ("store",),
    ("export",),
    ("sampling", "dataset"),
    ("training", "model_url"),
    ("calibration", "calibration_source"),
)


class RefusedParameter(ValueError):
    """A deployment run's parameter outside what the worker allows; the message names the setting."""


def _is_url(value: str) -> bool:
    # A built-in data set is a bare name ("digits", "mnist"); anything with a path or a scheme is a location.
    return "://" in value or "/" in value or value.startswith(".")


def _value(parameters: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = parameters
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _split(setting: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", setting) if item]


def _under(url: str, root: str) -> bool:
    return url == root or url.startswith(root.rstrip("/") + "/")


def allowed_roots(deployment_parameters: Mapping[str, Any]) -> list[str]:
    """The worker's PTQFLOW_ALLOWED_ROOTS, else every location in the deployment's saved parameters."""
    configured = os.environ.get(ALLOWED_ROOTS_ENV, "").strip()
    candidates: Iterable[str] = (
        _split(configured)
        if configured
        else (v for path in URL_PARAMETERS if isinstance(v := _value(deployment_parameters, path), str) and _is_url(v))
    )
    roots = []
    for candidate in candidates:
        try:
            roots.append(canonical_url(candidate))
        except StoreError:
            continue  # a root that names no usable location allows nothing
    return roots


def check_run_parameters(parameters: Mapping[str, Any], deployment_parameters: Mapping[str, Any]) -> None:
    """Raise RefusedParameter unless every location and the model function of a deployment run are allowed.

    Args:
        parameters: the run's parameters as the flow received them (pydantic models dumped to JSON types).
        deployment_parameters: the deployment's saved default parameters.
    """
    roots = allowed_roots(deployment_parameters)
    for path in URL_PARAMETERS:
        value = _value(parameters, path)
        if not isinstance(value, str) or not _is_url(value):
            continue
        name = ".".join(path)
        if ".." in re.split(r"[/\\]", value.split("?", 1)[0]):
            raise RefusedParameter(f"{name} {value!r} contains '..': name the location without it")
        try:
            url = canonical_url(value)
        except StoreError as error:
            raise RefusedParameter(f"{name}: {error}") from None
        if not any(_under(url, root) for root in roots):
            raise RefusedParameter(
                f"{name} {url} is outside the locations this deployment may use ({', '.join(roots) or 'none'}): "
                f"add a root to {ALLOWED_ROOTS_ENV} on the worker, or run it from the CLI"
            )
    tracking = _value(parameters, ("registry", "mlflow_uri"))
    trusted = {_value(deployment_parameters, ("registry", "mlflow_uri")), os.environ.get(TRACKING_URI_ENV)} - {None}
    if isinstance(tracking, str) and tracking not in trusted:
        known = ", ".join(sorted(trusted)) or "none"
        raise RefusedParameter(
            f"registry.mlflow_uri {tracking!r} is not this deployment's MLflow server ({known}): save it in the "
            f"deployment's parameters or set {TRACKING_URI_ENV} on the worker, or run it from the CLI"
        )
    model = _value(parameters, ("training", "model"))
    allowed_models = BUILTIN_MODELS | set(_split(os.environ.get(ALLOWED_MODELS_ENV, "")))
    if isinstance(model, str) and model not in allowed_models:
        raise RefusedParameter(
            f"training.model {model!r} is not allowed for deployment runs (importing it would run its code): add "
            f"it to {ALLOWED_MODELS_ENV} on the worker (now: {', '.join(sorted(allowed_models))})"
        )


def enforce_for_deployment_runs(parameters: Mapping[str, Any]) -> None:
    """Check a flow run's parameters when the run belongs to a deployment; a direct call (the CLI) is trusted."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if deployment.id is None:
        return
    # Not prefect.runtime.deployment.parameters: that is this run's parameters, the very form being checked.
    with get_client(sync_client=True) as client:
        saved = client.read_deployment(UUID(deployment.id)).parameters
    check_run_parameters(parameters, saved or {})

"""The trust boundary of a deployment: what a run triggered from the Prefect UI's form (or its API) may name.

Whoever runs the CLI is trusted: it is their machine and their credentials. A deployment's form is not: anyone
allowed to trigger the deployment fills it in, and the run executes on a worker with the worker's credentials.
So every location a form names has a role, and must lie inside a root of that role:

* ``data`` (read): ``sampling.dataset``, ``calibration.calibration_source``;
* ``models`` (read): ``training.model_url``;
* ``store`` (written): ``store``; ``export`` (written): ``export``.

The roots of each role are the worker's ``PTQFLOW_DATA_ROOTS``, ``PTQFLOW_MODEL_ROOTS``, ``PTQFLOW_STORE_ROOTS``
and ``PTQFLOW_EXPORT_ROOTS`` (URL prefixes separated by commas or whitespace); without one, the locations of that
role the deployment was created with (its saved parameters, which trigger rights cannot change). A location is
compared after it is resolved as a run would open it (symbolic links followed, a local path made absolute), and a
form may not name a home path (``~``), a path relative to the worker's folder, a chained URL (``a::b``) or ``..``;
a location written to may not lie inside a location read (nor contain one). A value equal to the deployment's own
saved value is its creator's, and is accepted as it is.

Besides locations, a run of a deployment accepts model functions (``module:function``) only from
``PTQFLOW_ALLOWED_MODELS`` besides the built-in models (importing a module runs its code); an MLflow tracking URI
only if it is the deployment's own or the worker's ``MLFLOW_TRACKING_URI``, and a registered model name only if
it is the deployment's own or in ``PTQFLOW_ALLOWED_REGISTERED_MODELS`` (a run moves its champion alias); credential
blocks only if they are the deployment's own or in ``PTQFLOW_ALLOWED_BLOCKS``.

A refused parameter fails the run before anything is read or written, naming the setting that would allow it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from ptqflow.storage.store import StoreError, canonical_url
from ptqflow.tasks.core.parameters import (
    LOCATION_ROLE,
    CalibrationParameters,
    RegistryParameters,
    SamplingParameters,
    TrainingParameters,
)

ROOTS_ENV = {
    "data": "PTQFLOW_DATA_ROOTS",
    "models": "PTQFLOW_MODEL_ROOTS",
    "store": "PTQFLOW_STORE_ROOTS",
    "export": "PTQFLOW_EXPORT_ROOTS",
}
READ_ROLES = ("data", "models")
# The one setting for every role, from before roles: it cannot say which root a run may write to.
ROLELESS_ROOTS_ENV = "PTQFLOW_ALLOWED_ROOTS"
ALLOWED_MODELS_ENV = "PTQFLOW_ALLOWED_MODELS"
ALLOWED_REGISTERED_MODELS_ENV = "PTQFLOW_ALLOWED_REGISTERED_MODELS"
ALLOWED_BLOCKS_ENV = "PTQFLOW_ALLOWED_BLOCKS"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
BUILTIN_MODELS = frozenset({"auto", "cnn", "mlp"})
# The flow's parameters that hold a parameter model, by name, and the flow's own location parameters.
SECTIONS: dict[str, type[BaseModel]] = {
    "sampling": SamplingParameters,
    "training": TrainingParameters,
    "calibration": CalibrationParameters,
}
FLOW_LOCATIONS: dict[tuple[str, ...], str] = {("store",): "store", ("export",): "export"}
BLOCK_PARAMETERS = ("storage_block", "export_block")


class RefusedParameter(ValueError):
    """A deployment run's parameter outside what the worker allows; the message names the setting."""


def location_parameters() -> dict[tuple[str, ...], str]:
    """Where each location sits in the flow's parameters (the same names in the form and in the CLI's JSON), with
    its role: the flow's store and export, and every parameter field marked with ``LOCATION_ROLE``."""
    found = dict(FLOW_LOCATIONS)
    for section, model in SECTIONS.items():
        for name, field in model.model_fields.items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and LOCATION_ROLE in extra:
                found[(section, name)] = str(extra[LOCATION_ROLE])
    return found


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


def _is_builtin_dataset(value: str) -> bool:
    from ptqflow.tasks.data.datasets import is_builtin

    return is_builtin(value)


def resolved(value: str) -> str:
    """``value`` as a run would open it: canonical (``storage.store.canonical_url``), and for a local path, with
    its symbolic links followed, so a link inside a root cannot lead outside it."""
    url = canonical_url(value)
    if url.startswith("file://"):
        return "file://" + os.path.realpath(url[len("file://") :])
    return url


def _form_location(name: str, value: str) -> str:
    """A location a form names, resolved; refused when it is a home path, relative to the worker's folder,
    chained, or climbs with ``..``."""
    if value.startswith("~"):
        raise RefusedParameter(f"{name} {value!r} is a home path: name the location by its full path or URL")
    if "::" in value:
        raise RefusedParameter(f"{name} {value!r} chains URLs: name one location")
    if ".." in re.split(r"[/\\]", value.split("?", 1)[0]):
        raise RefusedParameter(f"{name} {value!r} contains '..': name the location without it")
    if not urlsplit(value).scheme and not os.path.isabs(value):
        raise RefusedParameter(
            f"{name} {value!r} is relative to the worker's folder: name the location by its full path or URL"
        )
    try:
        return resolved(value)
    except StoreError as error:
        raise RefusedParameter(f"{name}: {error}") from None


def _is_location(path: tuple[str, ...], value: str) -> bool:
    # A built-in data set is a bare name ("digits", "mnist"), not a location.
    return not (path == ("sampling", "dataset") and _is_builtin_dataset(value))


def _saved_locations(deployment_parameters: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], str, str]]:
    for path, role in location_parameters().items():
        value = _value(deployment_parameters, path)
        if isinstance(value, str) and value and _is_location(path, value):
            yield path, role, value


def allowed_roots(deployment_parameters: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each role's roots: the worker's setting for the role, else the deployment's saved locations of that role."""
    if os.environ.get(ROLELESS_ROOTS_ENV, "").strip():
        raise RefusedParameter(
            f"{ROLELESS_ROOTS_ENV} does not say which roots a run may write to: replace it on the worker with "
            f"{', '.join(ROOTS_ENV.values())} (each a list of URL prefixes)"
        )
    saved: dict[str, list[str]] = {role: [] for role in ROOTS_ENV}
    for _, role, value in _saved_locations(deployment_parameters):
        saved[role].append(value)
    roots: dict[str, list[str]] = {}
    for role, setting in ROOTS_ENV.items():
        configured = os.environ.get(setting, "").strip()
        roots[role] = []
        for candidate in _split(configured) if configured else saved[role]:
            try:
                roots[role].append(resolved(candidate))
            except StoreError:
                continue  # a root that names no usable location allows nothing
    return roots


def _check_locations(parameters: Mapping[str, Any], deployment_parameters: Mapping[str, Any]) -> None:
    roots = allowed_roots(deployment_parameters)
    read_roots = [root for role in READ_ROLES for root in roots[role]]
    for path, role in location_parameters().items():
        value = _value(parameters, path)
        if not isinstance(value, str) or not value or not _is_location(path, value):
            continue
        name = ".".join(path)
        if value == _value(deployment_parameters, path):
            continue  # the deployment's own location, as its creator named it
        if path == ("sampling", "dataset") and not urlsplit(value).scheme and "/" not in value:
            raise RefusedParameter(
                f"{name} {value!r} is neither a built-in data set nor a full path or URL: name the data by its URL"
            )
        url = _form_location(name, value)
        if not any(_under(url, root) for root in roots[role]):
            raise RefusedParameter(
                f"{name} {url} is outside the {role} locations this deployment may use "
                f"({', '.join(roots[role]) or 'none'}): add a root to {ROOTS_ENV[role]} on the worker, or run it "
                "from the CLI"
            )
        if role not in READ_ROLES and any(_under(url, root) or _under(root, url) for root in read_roots):
            raise RefusedParameter(
                f"{name} {url} overlaps a location this deployment reads ({', '.join(read_roots)}): a run writes "
                f"there; choose a location under {ROOTS_ENV[role]} apart from the data and models"
            )


def _check_named(
    parameters: Mapping[str, Any], deployment_parameters: Mapping[str, Any], path: tuple[str, ...], setting: str
) -> None:
    """A name the run acts on (a registered model, a credentials block): the deployment's own, or allowed."""
    value = _value(parameters, path)
    allowed = {_value(deployment_parameters, path)} | set(_split(os.environ.get(setting, "")))
    if isinstance(value, str) and value not in allowed:
        known = ", ".join(sorted(v for v in allowed if isinstance(v, str))) or "none"
        raise RefusedParameter(
            f"{'.'.join(path)} {value!r} is not allowed for this deployment's runs (allowed: {known}): add it to "
            f"{setting} on the worker, or run it from the CLI"
        )


def check_run_parameters(parameters: Mapping[str, Any], deployment_parameters: Mapping[str, Any]) -> None:
    """Raise RefusedParameter unless every location, name and model function of a deployment run is allowed.

    Args:
        parameters: the run's parameters as the flow received them (pydantic models dumped to JSON types).
        deployment_parameters: the deployment's saved default parameters.
    """
    _check_locations(parameters, deployment_parameters)
    tracking = _value(parameters, ("registry", "mlflow_uri"))
    trusted = {_value(deployment_parameters, ("registry", "mlflow_uri")), os.environ.get(TRACKING_URI_ENV)} - {None}
    if isinstance(tracking, str) and tracking not in trusted:
        known = ", ".join(sorted(trusted)) or "none"
        raise RefusedParameter(
            f"registry.mlflow_uri {tracking!r} is not this deployment's MLflow server ({known}): save it in the "
            f"deployment's parameters or set {TRACKING_URI_ENV} on the worker, or run it from the CLI"
        )
    if isinstance(tracking, str):
        _check_registered_model(parameters, deployment_parameters)
    for block in BLOCK_PARAMETERS:
        _check_named(parameters, deployment_parameters, (block,), ALLOWED_BLOCKS_ENV)
    model = _value(parameters, ("training", "model"))
    allowed_models = BUILTIN_MODELS | set(_split(os.environ.get(ALLOWED_MODELS_ENV, "")))
    if isinstance(model, str) and model not in allowed_models:
        raise RefusedParameter(
            f"training.model {model!r} is not allowed for deployment runs (importing it would run its code): add "
            f"it to {ALLOWED_MODELS_ENV} on the worker (now: {', '.join(sorted(allowed_models))})"
        )


def _check_registered_model(parameters: Mapping[str, Any], deployment_parameters: Mapping[str, Any]) -> None:
    """The registered model a run would move the champion alias of, named or derived from the data set's name."""
    from ptqflow.flows.registry import registered_model_name

    def effective(of: Mapping[str, Any]) -> str:
        registry = RegistryParameters.model_validate(_value(of, ("registry",)) or {})
        return registered_model_name(registry, str(_value(of, ("sampling", "dataset")) or "digits"))

    name = effective(parameters)
    allowed = {effective(deployment_parameters)} | set(_split(os.environ.get(ALLOWED_REGISTERED_MODELS_ENV, "")))
    if name not in allowed:
        raise RefusedParameter(
            f"registry.registered_model {name!r} is not this deployment's registered model "
            f"({', '.join(sorted(allowed))}): add it to {ALLOWED_REGISTERED_MODELS_ENV} on the worker, or run it "
            "from the CLI"
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

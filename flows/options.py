"""The options of ``run`` and ``sweep``, derived from the parameter models: one option per field, named after the
field (or its ``OPTION_NAME``), with the field's description, default and bounds.

The Python API takes them as keywords, the command line as ``--flags`` and a recipe file as keys of one table per
group (``[conversion]``, ...): each reads them through here, so a field added to a model is an option everywhere,
and none of the three can name what the others cannot (``tests/flows/test_options.py`` compares them with the
flows' forms)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from ptqflow.storage.store import hold_signed_url
from ptqflow.tasks.core.parameters import (
    LOCATION_ROLE,
    OPTION_NAME,
    CalibrationParameters,
    ConversionParameters,
    GateParameters,
    RegistryParameters,
    RepairParameters,
    SamplingParameters,
    SweepParameters,
    TrainingParameters,
    ValidationParameters,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

Model = TypeVar("Model", bound=BaseModel)

# Each flow's parameter groups: the flow's parameter name and its model (the UI form shows the same groups).
UPSTREAM_GROUPS: dict[str, type[BaseModel]] = {
    "sampling": SamplingParameters,
    "training": TrainingParameters,
    "calibration": CalibrationParameters,
}
RUN_GROUPS: dict[str, type[BaseModel]] = {
    **UPSTREAM_GROUPS,
    "conversion": ConversionParameters,
    "validation": ValidationParameters,
    "gate": GateParameters,
    "repair": RepairParameters,
    "registry": RegistryParameters,
}
SWEEP_GROUPS: dict[str, type[BaseModel]] = {
    **UPSTREAM_GROUPS,
    "validation": ValidationParameters,
    "gate": GateParameters,
    "registry": RegistryParameters,
    "sweep": SweepParameters,
}
# The flows' own parameters besides the groups (the CLI spells each as --store, ...; a recipe's top-level keys).
FLOW_SETTINGS = ("store", "seed", "export", "storage_block", "export_block")
# Where a signed URL (presigned S3, signed GCS, Azure SAS) is held back: Prefect records parameters, and the
# manifests, logs and exports repeat them; only the reader gets the secret back (storage.store).
HELD_ROLES = ("data", "models")


class InvalidOption(ValueError):
    """An option's value is refused; the message names the option as the command line spells it, and the fix."""


class UnknownOption(InvalidOption, TypeError):
    """An option no parameter model has (a TypeError too, as for any unknown keyword argument)."""


def option_name(model: type[BaseModel], field: str) -> str:
    """A field's option name: its own, or the ``OPTION_NAME`` it declares."""
    info = model.model_fields.get(field)
    extra = info.json_schema_extra if info is not None and isinstance(info.json_schema_extra, dict) else {}
    return str(extra.get(OPTION_NAME, field))


@dataclass(frozen=True)
class Option:
    """One field of one group, as an option."""

    group: str
    field: str
    model: type[BaseModel]

    @property
    def info(self) -> FieldInfo:
        return self.model.model_fields[self.field]

    @property
    def extra(self) -> dict[str, Any]:
        extra = self.info.json_schema_extra
        return extra if isinstance(extra, dict) else {}

    @property
    def name(self) -> str:
        """The API keyword; ``flag`` on the command line."""
        return option_name(self.model, self.field)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@cache
def _options(groups: tuple[tuple[str, type[BaseModel]], ...]) -> dict[str, Option]:
    found: dict[str, Option] = {}
    for group, model in groups:
        for field in model.model_fields:
            option = Option(group, field, model)
            if option.name in found or option.name in FLOW_SETTINGS:
                raise TypeError(f"{model.__name__}.{field}: the option name {option.name!r} is taken; set OPTION_NAME")
            found[option.name] = option
    return found


def options_of(groups: Mapping[str, type[BaseModel]]) -> dict[str, Option]:
    """Every option of ``groups``, by name."""
    return _options(tuple(groups.items()))


def parameters(schema: type[Model], **given: Any) -> Model:
    """``schema`` from its fields given by name (None means "the default").

    Raises:
        InvalidOption: the first field the schema refuses, as ``--option-name``, with the schema's reason.
    """
    try:
        return schema(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        field = str(first["loc"][0]) if first["loc"] else None
        what = "--" + option_name(schema, field).replace("_", "-") if field else "options"
        raise InvalidOption(f"invalid {what}: {message}") from None


def group_parameters(groups: Mapping[str, type[BaseModel]], given: Mapping[str, Any]) -> dict[str, BaseModel]:
    """Each group's parameters from the options given by name (None, or left out, means the field's default).

    Raises:
        InvalidOption: an option no group has (named, with the fix), or a value a model refuses.
    """
    known = options_of(groups)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise UnknownOption(
            f"unknown option {', '.join(map(repr, unknown))}: the options are the parameter models' fields "
            f"({', '.join(sorted(known))})"
        )
    by_group: dict[str, dict[str, Any]] = {group: {} for group in groups}
    for name, value in given.items():
        option = known[name]
        if isinstance(value, str) and option.extra.get(LOCATION_ROLE) in HELD_ROLES:
            value = hold_signed_url(value)
        by_group[option.group][option.field] = value
    return {group: parameters(model, **by_group[group]) for group, model in groups.items()}


def read_recipe(url: str, groups: Mapping[str, type[BaseModel]]) -> dict[str, Any]:
    """A recipe file (TOML or YAML: top-level ``store``, ``seed``, ``export``, ...; one table per group, its keys
    the fields of the group's model, as in the flow's parameters) as options by name, which command-line values or
    keywords then override.

    Raises:
        InvalidOption: the file cannot be read or parsed, or names a key no group or setting has.
    """
    text = _recipe_text(url)
    try:
        if Path(url).suffix.lower() in (".yaml", ".yml"):
            import yaml

            document = yaml.safe_load(text)
        else:
            document = tomllib.loads(text)
    except Exception as error:  # each parser's own error type: the message names the line
        raise InvalidOption(f"--config {url} is not valid {_kind(url)}: {str(error).splitlines()[0]}") from None
    if not isinstance(document, dict):
        raise InvalidOption(f"--config {url} holds no table of settings: write `[conversion]` tables of options")
    options: dict[str, Any] = {}
    for key, value in document.items():
        if key in FLOW_SETTINGS:
            options[key] = value
        elif key in groups and isinstance(value, dict):
            fields = groups[key].model_fields
            for field, inner in value.items():
                if field not in fields:
                    raise UnknownOption(
                        f"--config {url}: [{key}] has no field {field!r}: its fields are {', '.join(fields)}"
                    )
                options[Option(key, field, groups[key]).name] = inner
        else:
            raise UnknownOption(
                f"--config {url}: unknown key {key!r}: the recipe's keys are {', '.join(FLOW_SETTINGS)} and the "
                f"tables {', '.join(f'[{g}]' for g in groups)}"
            )
    return options


def _kind(url: str) -> str:
    return "YAML" if Path(url).suffix.lower() in (".yaml", ".yml") else "TOML"


def _recipe_text(url: str) -> str:
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            return str(f.read(1 << 20))
    except (OSError, ValueError) as error:
        raise InvalidOption(f"cannot read --config {url} ({type(error).__name__}): check the path") from None

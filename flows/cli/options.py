"""The ``ptqflow`` commands' options. Those of ``run``, ``sweep`` and ``serve`` are the parameter models' fields
(``flows.options``), turned into Typer options here: name, help, default and type come from the field, and the
commands take them as one group (``takes``), so no command can drift from the models or from the others. The
rest (the store, the export, output and credentials) are defined once below."""

# No `from __future__ import annotations`: Typer reads these annotations from the commands' signatures.
import enum
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from datetime import date, datetime
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

from ptqflow.flows.options import RUN_GROUPS, SWEEP_GROUPS, Option, options_of
from ptqflow.tasks.core.parameters import OPTION_ENVVAR, OPTION_FLAGS, RegistryParameters

Command = TypeVar("Command", bound=Callable[..., Any])


def help_for(schema: type[BaseModel], field: str) -> str:
    info = schema.model_fields[field]
    default = getattr(info.default, "value", info.default)
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{info.description} \\[default: {shown}]"


RunStoreOption = Annotated[
    str | None,
    typer.Option(
        envvar="PTQFLOW_STORE",
        help="fsspec URL of the artifact store (folder, s3://bucket/prefix, ...). [default: ./ptqflow-store]",
    ),
]
SeedOption = Annotated[int | None, typer.Option(help="Seed for sampling, training and calibration. [default: 0]")]
ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        help="A run recipe (TOML or YAML): store, seed, export and one table of options per group ([sampling], "
        "[conversion], [gate], ...); options given here override it.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show Prefect's and TensorFlow's logs on the console.")
]


StoreOption = Annotated[str, typer.Option(envvar="PTQFLOW_STORE", help="fsspec URL of the artifact store.")]
ExportOption = Annotated[
    str | None,
    typer.Option(
        envvar="PTQFLOW_EXPORT",
        help="fsspec URL to publish a passing run to: a new version folder, verified, then latest.json.",
    ),
]
RequiredExportOption = Annotated[str, typer.Option(envvar="PTQFLOW_EXPORT", help="fsspec URL of the export.")]
LockWaitOption = Annotated[
    float,
    typer.Option(
        "--wait",
        min=0,
        help="Seconds to wait for a run that is using the export (it holds the export's lock while it runs); then "
        "give up.",
    ),
]


def _without_none(annotation: Any) -> Any:
    """``X`` for ``X | None``; any other annotation as it is."""
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(kinds) == 1:
        return kinds[0]
    return annotation


def _cli_type(annotation: Any) -> type:
    """What the command line reads for a field of this type (the model then validates it): an enum's choices, a
    number, a flag, a day, or text (comma-separated values for a tuple, a size such as 256KiB)."""
    annotation = _without_none(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation
    if annotation in (bool, int, float):
        return annotation
    if annotation is date:
        return datetime
    return str


def cli_parameter(option: Option) -> inspect.Parameter:
    """The command-line option for one field: ``--name``, its help and default from the field."""
    kind = _cli_type(option.info.annotation)
    flags = [option.flag]
    if kind is bool:
        flags = [str(option.extra.get(OPTION_FLAGS, f"{option.flag}/--no-{option.flag[2:]}"))]
    settings: dict[str, Any] = {"help": help_for(option.model, option.field)}
    if kind is datetime:
        settings["formats"] = ["%Y-%m-%d"]
    if OPTION_ENVVAR in option.extra:
        settings["envvar"] = str(option.extra[OPTION_ENVVAR])
    annotation = Annotated[kind | None, typer.Option(*flags, **settings)]  # type: ignore[valid-type]
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def option_group(name: str, groups: Mapping[str, type[BaseModel]], doc: str) -> Callable[..., None]:
    """An option group (see ``takes``) with one option per field of ``groups``' models."""

    def group(**given: Any) -> None:
        """Carries the signature only."""

    group.__name__ = group.__qualname__ = name
    group.__doc__ = doc
    parameters = [cli_parameter(option) for option in options_of(groups).values()]
    group.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return group


def api_values(given: Mapping[str, Any], groups: Mapping[str, type[BaseModel]], as_json: bool) -> dict[str, Any]:
    """The options given on the command line as the API takes them: a day as a date, comma-separated integers or
    names as tuples (other text, a model reads itself); None for an option not given."""
    from ptqflow.flows.cli.common import integers

    values = {}
    for name, value in given.items():
        option = options_of(groups)[name]
        annotation = _without_none(option.info.annotation)
        inner = typing.get_args(annotation) if typing.get_origin(annotation) is tuple else ()
        if isinstance(value, datetime):
            value = value.date()
        elif isinstance(value, str) and inner[:1] == (int,):
            examples = option.info.examples or [option.info.default]
            value = integers(value, option.flag, ",".join(map(str, examples[0] or ())), as_json)
        elif isinstance(value, str) and inner and isinstance(inner[0], type) and issubclass(inner[0], str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        values[name] = value
    return values


RUN_OPTIONS = option_group(
    "options",
    RUN_GROUPS,
    "Every field of the pipeline's parameter models: sampling, training, calibration, "
    "conversion, validation, the gate, repair and the registry.",
)
SWEEP_OPTIONS = option_group(
    "options",
    SWEEP_GROUPS,
    "Every field of the sweep's parameter models: sampling, training, calibration, "
    "validation, the gate, the registry and the sweep's grid.",
)


# A command decorated with ``takes(GROUP, ...)`` has every option of each group and receives them as one dict per
# group, keyed by the group's name.
def credentials(
    storage_block: Annotated[
        str | None,
        typer.Option(
            help="Prefect block holding the store's credentials: a Secret block's name (JSON of fsspec storage "
            "options), or with prefect-aws aws-credentials/NAME or s3-bucket/NAME. Its values are never printed or "
            "stored."
        ),
    ] = None,
    export_block: Annotated[
        str | None, typer.Option(help="Prefect block holding the export target's credentials (as --storage-block).")
    ] = None,
) -> None:
    """Credentials from Prefect blocks, by name."""


MlflowUriOption = Annotated[
    str | None, typer.Option(envvar="MLFLOW_TRACKING_URI", help=help_for(RegistryParameters, "mlflow_uri"))
]
RegisteredModelOption = Annotated[str | None, typer.Option(help=help_for(RegistryParameters, "registered_model"))]


def takes(*groups: Callable[..., None]) -> Callable[[Command], Command]:
    """Give a command every option of ``groups``; it is called with one keyword argument per group (named after
    the group) holding that group's options as given."""
    grouped = {group.__name__: inspect.signature(group).parameters for group in groups}

    def decorate(command: Command) -> Command:
        own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name not in grouped]
        shared = [p for parameters in grouped.values() for p in parameters.values()]

        @functools.wraps(command)
        def with_groups(**given: Any) -> Any:
            groups_given = {name: {n: given.pop(n) for n in parameters} for name, parameters in grouped.items()}
            return command(**given, **groups_given)

        del with_groups.__wrapped__  # Typer must read the signature below, not the command's own
        signature = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in [*own, *shared]])
        with_groups.__signature__ = signature  # type: ignore[attr-defined]
        with_groups.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return with_groups  # type: ignore[return-value]

    return decorate

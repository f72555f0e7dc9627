"""Options stated once: every field of the flows' parameter models is an option of the command line, a keyword of
the Python API, a field of the Prefect UI's form and a key of a recipe file, with the same name and the same
meaning (flows.options)."""

from __future__ import annotations

import inspect

import pytest
import typer

from ptqflow.flows.api import pipeline_arguments, sweep_arguments
from ptqflow.flows.cli import app
from ptqflow.flows.cli.options import api_values
from ptqflow.flows.options import (
    FLOW_SETTINGS,
    RUN_GROUPS,
    SWEEP_GROUPS,
    InvalidOption,
    UnknownOption,
    options_of,
    read_recipe,
)
from ptqflow.tasks.core.parameters import CalibrationMethod


def click_command(name: str):
    command = typer.main.get_command(app)
    return command.commands[name]  # type: ignore[attr-defined]


def cli_flags(name: str) -> set[str]:
    return {flag for param in click_command(name).params for flag in [*param.opts, *param.secondary_opts]}


def parsed(command: str, args: list[str], groups) -> dict:
    """The API's options from a command line, as the command hands them on."""
    context = click_command(command).make_context(command, args)
    return api_values({name: context.params[name] for name in options_of(groups)}, groups, as_json=False)


@pytest.mark.parametrize(("command", "groups"), [("run", RUN_GROUPS), ("serve", RUN_GROUPS), ("sweep", SWEEP_GROUPS)])
def test_every_field_of_every_group_is_a_command_line_option(command, groups):
    flags = cli_flags(command)
    missing = [option.flag for option in options_of(groups).values() if option.flag not in flags]
    assert missing == []


def test_the_tracking_uri_is_read_from_mlflows_own_variable_as_before():
    [param] = [p for p in click_command("run").params if p.name == "mlflow_uri"]
    assert param.envvar == "MLFLOW_TRACKING_URI"


def test_every_field_of_every_group_is_a_field_of_the_flows_forms():
    from prefect.utilities.callables import parameter_schema

    from ptqflow.flows.pipeline import ptq_pipeline
    from ptqflow.flows.sweep import ptq_sweep

    for flow, groups in ((ptq_pipeline, RUN_GROUPS), (ptq_sweep, SWEEP_GROUPS)):
        schema = parameter_schema(flow.fn).model_dump()
        properties = schema["properties"]
        assert set(groups) | {"store", "seed", "export", "storage_block", "export_block"} == set(properties)
        for group, model in groups.items():
            reference = properties[group]["$ref"].rsplit("/", 1)[-1]
            assert set(schema["definitions"][reference]["properties"]) == set(model.model_fields), group


@pytest.mark.parametrize(("arguments", "groups"), [(pipeline_arguments, RUN_GROUPS), (sweep_arguments, SWEEP_GROUPS)])
def test_every_option_is_a_keyword_of_the_api_that_sets_its_field(arguments, groups):
    for option in options_of(groups).values():
        default = option.info.get_default(call_default_factory=True)
        if default is None:  # None means "not given": the fields given values are checked below and on the CLI
            continue
        built = arguments(**{option.name: default})
        assert option.field in built[option.group].model_fields_set, option.name  # given, not defaulted
        assert getattr(built[option.group], option.field) == default
    assert set(inspect.signature(arguments).parameters) == {"config", "options"}


def test_the_fields_no_option_reached_before_are_set_from_the_command_line():
    given = parsed(
        "run",
        [
            "--validation-fraction",
            "0.1",
            "--test-fraction",
            "0.25",
            "--batch-size",
            "16",
            "--learning-rate",
            "0.01",
            "--early-stopping-patience",
            "3",
            "--calibration-batch-size",
            "32",
            "--validation-batch-size",
            "128",
            "--num-threads",
            "2",
        ],
        RUN_GROUPS,
    )
    arguments = pipeline_arguments(**given)
    assert arguments["sampling"].validation_fraction == 0.1 and arguments["sampling"].test_fraction == 0.25
    training = arguments["training"]
    assert (training.batch_size, training.learning_rate, training.early_stopping_patience) == (16, 0.01, 3)
    assert arguments["conversion"].calibration_batch_size == 32
    assert (arguments["validation"].batch_size, arguments["validation"].num_threads) == (128, 2)


def test_tuples_days_and_flags_are_read_from_the_command_line_as_the_api_takes_them():
    given = parsed(
        "sweep",
        ["--calibration-sizes", "10,20", "--configurations", "int8, int8-mse"]
        + ["--dataset", "s3://bucket/data/", "--since", "2026-01-02"],
        SWEEP_GROUPS,
    )
    arguments = sweep_arguments(**given)
    assert arguments["sweep"].calibration_sizes == (10, 20)
    assert arguments["sweep"].configurations == ("int8", "int8-mse")
    assert str(arguments["sampling"].since) == "2026-01-02"
    assert not pipeline_arguments(**parsed("run", ["--per-tensor", "--no-repair"], RUN_GROUPS))[
        "conversion"
    ].per_channel


def test_an_unknown_keyword_is_refused_naming_it():
    with pytest.raises(UnknownOption, match="unknown option 'calibration_sise'"):
        pipeline_arguments(calibration_sise=100)
    with pytest.raises(UnknownOption, match="'conversion'"):  # a group is not an option: its fields are
        pipeline_arguments(conversion={})


def test_a_recipe_sets_the_groups_fields_and_given_options_override_it(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'seed = 3\nstore = "memory://recipe-store"\n\n[conversion]\ncalibration_method = "mse"\n\n'
        "[calibration]\ncalibration_size = 50\n\n[validation]\nbatch_size = 512\n"
    )
    arguments = pipeline_arguments(config=str(recipe), calibration_size=60)
    assert (arguments["seed"], arguments["store"]) == (3, "memory://recipe-store")
    assert arguments["conversion"].calibration_method is CalibrationMethod.mse
    assert arguments["calibration"].calibration_size == 60
    assert arguments["validation"].batch_size == 512


def test_a_yaml_recipe_reads_as_a_toml_one(tmp_path):
    (tmp_path / "recipe.yaml").write_text("seed: 4\nsweep:\n  calibration_sizes: [10, 20]\n")
    arguments = sweep_arguments(config=str(tmp_path / "recipe.yaml"))
    assert arguments["seed"] == 4 and arguments["sweep"].calibration_sizes == (10, 20)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[conversion]\ncalibration_metod = "mse"\n', "[conversion] has no field 'calibration_metod': its fields are"),
        ("nonsense = 1\n", "unknown key 'nonsense': the recipe's keys are store, seed"),
        ("[sweep]\ncalibration_sizes = [10]\n", "unknown key 'sweep'"),  # a sweep's table, in a run's recipe
        ("[conversion\n", "is not valid TOML"),
        ("[gate]\nmax_accuracy_drop = -1\n", "invalid --max-accuracy-drop"),
    ],
)
def test_a_recipe_with_a_wrong_key_or_value_is_one_line_naming_it(tmp_path, text, message):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text)
    with pytest.raises(InvalidOption, match=None) as refused:
        pipeline_arguments(config=str(recipe))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_recipe_that_cannot_be_read_says_so(tmp_path):
    with pytest.raises(InvalidOption, match="cannot read --config .*missing.toml"):
        read_recipe(str(tmp_path / "missing.toml"), RUN_GROUPS)


def test_option_names_are_unique_and_never_a_flow_setting():
    for groups in (RUN_GROUPS, SWEEP_GROUPS):
        names = [option.name for option in options_of(groups).values()]
        assert len(names) == len(set(names)) and not set(names) & set(FLOW_SETTINGS)


def test_the_recipe_in_the_docs_reads_as_written(tmp_path):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "recipe.toml").write_text(example)
    arguments = pipeline_arguments(config=str(tmp_path / "recipe.toml"))
    assert arguments["conversion"].calibration_method is CalibrationMethod.mse
    assert arguments["gate"].ram_budget == 256 * 1024 and arguments["sampling"].validation_fraction == 0.1

"""report.md and report.html, rendered from a validation report (parsed from its JSON form)."""

from __future__ import annotations

import base64
import re

import pytest

from ptqflow.tasks.core.validation_report import ValidationReport
from ptqflow.tasks.release.documents import RunManifest
from ptqflow.tasks.views import render

pytestmark = pytest.mark.smoke  # also run on the oldest supported TensorFlow (.ci/run)


def model(accuracy: float, bytes_: int | None) -> dict:
    return {
        "accuracy": accuracy,
        "per_class_accuracy": {"cat": accuracy, "dog": None},
        "confusion_matrix": [[9, 1], [0, 0]],
        "agreement_with_float": 0.9,
        "output_mae": 0.01,
        "output_sqnr_db": 30.0,
        "bytes": bytes_,
        "speed": {
            "latency_ms": {"p50": 0.5, "p95": 0.7, "runs": 100},
            "throughput_per_s": 1000.0,
            "throughput_batch": 10,
        },
    }


def render_markdown(document: dict) -> str:
    return render.render_markdown(ValidationReport.model_validate(document))


def render_html(document: dict) -> str:
    return render.render_html(ValidationReport.model_validate(document))


REF = {"uri": "memory://store/blob", "sha256": "0" * 64, "bytes": 1}


@pytest.fixture
def document() -> dict:
    return {
        "dataset": REF,
        "model": REF,
        "quantized_model": REF,
        "float_tflite": REF,
        "conversion": None,
        "metrics": {
            "validated": True,
            "not_validated_reason": None,
            "samples": 10,
            "class_names": ["cat", "dog"],
            "float_accuracy": 0.9,
            "quantized_accuracy": 0.8,
            "accuracy_drop_pp": 10.0,
            "tflite_float_accuracy": 0.9,
            "agreement": 0.9,
            "rerun_max_difference": 0.0,
            "float_bytes": 400,
            "quantized_bytes": 100,
            "size_ratio": 4.0,
            "num_threads": 2,
            "models": {
                "float_keras": model(0.9, None),
                "float_tflite": model(0.9, 400),
                "quantized_tflite": model(0.8, 100),
            },
            "layers": [
                {
                    "layer": "dense",
                    "op": "FULLY_CONNECTED",
                    "tensor": "t",
                    "scale": 20.0,
                    "rmse_over_scale": 0.09,
                    "mean_abs_error": 0.1,
                    "typical_steps": 0.05,
                    "badness": 20.0,
                },
                {
                    "layer": "model output",
                    "op": "SOFTMAX",
                    "tensor": "s",
                    "scale": 0.0039,
                    "rmse_over_scale": 0.3,
                    "mean_abs_error": 0.0,
                    "typical_steps": None,
                    "badness": 1.04,
                },
            ],
            "layers_unavailable": None,
            "audit": {
                "full_integer": False,
                "float_tensors": ["x"],
                "float_ops": [{"op": "FULLY_CONNECTED", "output": "dense"}],
                "flex_ops": [],
                "dtypes": {"float32": 1, "int8": 5},
                "ops": ["FULLY_CONNECTED", "SOFTMAX"],
                "input": {"dtype": "int8", "scale": 0.06, "zero_point": -128},
                "output": {"dtype": "int8", "scale": 1 / 256, "zero_point": -128},
            },
        },
    }


def test_markdown_has_every_section(document):
    text = render_markdown(document)
    for heading in (
        "## Models (test split)",
        "## Per-class accuracy",
        "## Per-layer quantization error",
        "## Audit",
        "## Confusion matrices",
    ):
        assert heading in text
    assert "| dense | FULLY_CONNECTED | 20.00 |" in text and "| n/a |" in text
    assert "**ops with float tensors**: FULLY_CONNECTED (dense)" in text


@pytest.mark.parametrize(
    ("dynamic", "says"),
    [
        (None, "sha256 `" + "0" * 64 + "`."),  # a report from before the audit looked at shapes claims nothing
        ([], "static shapes, one sample per call"),
        (["serving_default_x:0", "a", "b", "c"], "**4 tensors with shapes known only at run time** (serving_defa"),
    ],
)
def test_the_report_names_the_judged_file_and_its_shapes(document, dynamic, says):
    if dynamic is not None:
        document["metrics"]["audit"]["dynamic_tensors"] = dynamic
    line = next(line for line in render_markdown(document).splitlines() if line.startswith("Judged file"))
    assert line.startswith("Judged file: the quantized `.tflite`, 1 B, sha256 `" + "0" * 64 + "`")
    assert says in line
    assert ("static shapes" in line) is (dynamic == [])
    assert line.replace("**", "").replace("`", "") in render_html(document)


def test_html_is_self_contained_with_three_png_plots(document):
    page = render_html(document)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # accuracy per model, per-layer error, confusion matrices
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert "http://" not in page and "https://" not in page  # nothing to fetch: it opens offline
    assert render_html(document) == page  # same document, same bytes


def footprint(arena: int, scratch: int) -> dict:
    return {
        "flash_bytes": 100_000,
        "weight_bytes": 90_000,
        "arena_bytes": arena,
        "peak_live_bytes": arena - 64,
        "ops": ["CONV_2D", "MAX_POOL_2D", "FULLY_CONNECTED"],
        "live_bytes": [arena - 64, arena // 2, 100],
        "interpreter": {
            "arena_bytes": arena + scratch,
            "planned_bytes": arena,
            "scratch_tensors": 1 if scratch else 0,
            "largest_scratch_bytes": scratch,
            "runtime_sized_tensors": 0,
        },
    }


def test_the_device_footprint_is_a_table_a_sentence_per_model_and_a_plot(document):
    document["metrics"]["device"] = {"float_tflite": footprint(40_960, 0), "quantized_tflite": footprint(10_240, 4608)}
    text = render_markdown(document)
    assert "## Device footprint (one sample at a time)" in text
    assert "| quantized .tflite | 97.7 KiB | 87.9 KiB | 10.0 KiB | 14.5 KiB | 9.9 KiB |" in text
    assert "the plan gives 10,240 B against its 14,848 B; its kernels add 1 scratch tensor(s) (largest 4,608 B" in text
    float_line = next(line for line in text.splitlines() if line.startswith("- float .tflite:"))
    assert float_line.endswith("the plan gives 40,960 B against its 40,960 B")  # no scratch, nothing to explain
    page = render_html(document)
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 4  # and live tensor memory per operator
    assert 'alt="tensor memory live per operator"' in page


def test_not_validated_is_said_plainly(document):
    document["metrics"].update(
        validated=False,
        not_validated_reason="the model uses TensorFlow (Flex) ops",
        models={},
        quantized_accuracy=None,
        accuracy_drop_pp=None,
    )
    assert "**Not validated**: the model uses TensorFlow (Flex) ops" in render_markdown(document)
    assert "Not validated: the model uses TensorFlow (Flex) ops" in render_html(document)


def test_the_champion_decision_is_in_both_renderings(document):
    assert "Promotion" not in render_markdown(document)  # a run without an export decided nothing
    document["promotion"] = {
        "promote": False,
        "challenger_accuracy": 0.351,
        "champion_accuracy": 0.9805,
        "champion_version": "v1",
        "champion_run_id": "r1",
        "tolerance_pp": 0.0,
        "compared_rows": 359,
        "comparison": "all 359 rows of this test split, none of which it trained on",
        "message": "not promoted: accuracy 35.10% against 98.05% for the exported version v1 on all 359 rows ...",
    }
    text = render_markdown(document)
    assert "## Promotion\n\n- not promoted: accuracy 35.10% against 98.05%" in text
    assert (
        "- this model: 35.10%; exported model (version v1): 98.05% (on all 359 rows of this test split, none of "
        "which it trained on; tolerance 0.0 pp)"
    ) in text
    page = render_html(document)
    assert "<h2>Promotion</h2>" in page and "this model: 35.10%; exported model (version v1): 98.05%" in page


def test_the_ranking_margin_is_stated_and_a_close_call_is_flagged(document):
    text = render_markdown(document)
    assert "Ranking margin: dense (FULLY_CONNECTED) is 19.23x as bad as model output (SOFTMAX)." in text
    assert "close call" not in text and "close call" not in render_html(document)
    document["metrics"]["layers"][1]["badness"] = 19.0  # within 10% of dense's 20.0
    text = render_markdown(document)
    assert "**Ranking margin: dense (FULLY_CONNECTED) is 1.05x as bad as model output (SOFTMAX); a close call" in text
    assert "<p class='bad'>Ranking margin: dense" in render_html(document)


def test_the_runs_table_shows_each_runs_figures_and_a_dash_where_a_sweep_had_none():
    from rich.console import Console

    figures = {
        "float_accuracy": 0.99,
        "tflite_float_accuracy": 0.99,
        "quantized_accuracy": 0.985,
        "accuracy_drop_pp": 0.5,
        "agreement": 0.99,
        "float_bytes": 400,
        "quantized_bytes": 100,
        "full_integer": True,
        "float_tensors": [],
    }
    common = {"store": "file:///s", "created_at": "2026-11-30T12:00:00+00:00", "export": None}
    manifests = [
        {**common, "run_id": "aaaaaaaa-1", "flow": "ptq-pipeline", "status": "passed", "metrics": figures},
        {
            **common,
            "run_id": "bbbbbbbb-2",
            "flow": "ptq-sweep",
            "status": "failed",
            "metrics": {"sweep": [], "best": None},
        },
    ]
    console = Console(record=True, width=120)
    render.print_runs([RunManifest.model_validate(m) for m in manifests], console)
    lines = console.export_text().splitlines()
    assert any("aaaaaaaa" in line and "98.50%" in line and "0.50" in line for line in lines)
    assert any("bbbbbbbb" in line and line.count("—") == 2 for line in lines)


def test_the_report_says_how_the_model_was_converted(document):
    assert "Conversion:" not in render_markdown(document)  # none recorded (a report from before it was)
    document["conversion"] = {"calibration_method": "mse", "equalize": True, "bias_correction": True}
    line = (
        "Conversion: full_integer, ops int8, int8 in, int8 out, per-channel weights, mse activation ranges, "
        "equalized activation channels, corrected biases."
    )
    assert line in render_markdown(document) and line in render_html(document)
    document["conversion"] = {"calibration_method": "percentile", "percentile": 99.9}
    assert "percentile activation ranges (99.9%)" in render_markdown(document)
    assert "equalized" not in render_markdown(document)


def test_class_names_with_dollar_signs_are_drawn_as_text(document):
    """matplotlib reads $...$ as math by default, and fails on what does not parse: a class named like TeX must
    not fail the report after the model was trained."""
    names = ["$\\foo$", "$a_{b"]
    document["metrics"]["class_names"] = names
    for m in document["metrics"]["models"].values():
        m["per_class_accuracy"] = dict(zip(names, [0.9, None]))
    assert names[0] in render_markdown(document)
    assert len(re.findall(r'src="data:image/png;base64,', render_html(document))) >= 3  # the plots were drawn


def test_many_classes_give_the_most_confused_pairs_not_a_matrix():
    import numpy as np

    from ptqflow.tasks.evaluation.metrics import DENSE_CONFUSION_CLASSES, model_metrics

    n_classes = 100_000  # a dense matrix would be 75 GiB
    labels = np.arange(2000, dtype=np.int64) * 50
    predicted = labels.copy()
    labels[:30], predicted[:30] = 3, 7  # the most frequent mistake: thirty rows of class 3 called 7
    labels[30:35], predicted[30:35] = 5, 6

    class Scores(np.ndarray):  # outputs whose top class is ``predicted``, without 2000 x 100,000 scores
        def argmax(self, axis=None, out=None, **kwargs):
            return predicted

    scores = np.zeros((2000, 1), np.float32).view(Scores)
    result = model_metrics(scores, scores, labels, [f"c{i}" for i in range(n_classes)])
    assert n_classes > DENSE_CONFUSION_CLASSES and result.confusion_matrix == []
    assert [(c.true, c.predicted, c.count) for c in result.most_confused] == [("c3", "c7", 30), ("c5", "c6", 5)]
    assert result.per_class_accuracy["c3"] == 0.0 and result.per_class_accuracy["c5000"] == 1.0


def test_a_report_without_a_matrix_shows_the_most_confused_classes(document):
    for m in document["metrics"]["models"].values():
        m["confusion_matrix"] = []
        m["most_confused"] = [{"true": "cat", "predicted": "dog", "count": 30}]
    markdown = render_markdown(document)
    assert "## Most confused classes" in markdown and "| cat | dog | 30 |" in markdown
    assert "## Confusion matrices" not in markdown
    assert len(re.findall(r'src="data:image/png;base64,', render_html(document))) >= 2  # no matrix plot to fail

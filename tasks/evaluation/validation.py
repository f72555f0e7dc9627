"""What the validation stage (``tasks.stages.validate``) measures: float vs quantized figures with the LiteRT
Interpreter, a dtype audit, sizes, speed and per-layer error, as a typed ``ValidationReport``.

The gate that judges it is ``tasks.evaluation.gate``; running ``.tflite`` models is ``tasks.evaluation.interpreter``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ptqflow.tasks.core.artifacts import MixedPrecisionChoice, RepairResult, TflmFigures
from ptqflow.tasks.core.parameters import ConversionParameters, DeviceTarget, ModelTask, ValidationParameters
from ptqflow.tasks.core.progress import report
from ptqflow.tasks.core.validation_report import (
    LayerError,
    MixedPrecisionCost,
    ModelKind,
    ModelMetrics,
    RepairCost,
    ValidationMetrics,
)
from ptqflow.tasks.evaluation.device import device_footprint
from ptqflow.tasks.evaluation.diagnose import layer_errors
from ptqflow.tasks.evaluation.fidelity import TaskFigures, fidelity_in_words, refusals
from ptqflow.tasks.evaluation.interpreter import (
    RowFailure,
    TflitePredictor,
    audit_tensor_types,
    keras_speed,
    refused_rows,
    rerun_max_difference,
    tflite_speed,
    unrunnable_samples,
)
from ptqflow.tasks.evaluation.metrics import ModelSums, TaskSums, increase_pct, worst_sqnr
from ptqflow.tasks.evaluation.shards import Predictions
from ptqflow.tasks.evaluation.tflm import TflmRows, figures_on_tflm, tflm_on_rows, tflm_rows
from ptqflow.tasks.evaluation.vela import VelaCompilation, compile_for_npu
from ptqflow.tasks.models.feeds import model_input_slots, predict_keras
from ptqflow.tasks.models.outputs import model_outputs

if TYPE_CHECKING:
    import keras


# The test split is read, predicted and summed this many bytes of features at a time (``window_rows``): what
# validation holds grows with this, not with the split. Predicting a window holds about 18 times its bytes (Keras's
# float32 copies and batches; measured on 28x28 uint8 images): about 150 MB at 8 MiB.
WINDOW_BYTES = 8 << 20


def window_rows(row_bytes: int, batch_size: int) -> int:
    """Rows per window of the test split: about ``WINDOW_BYTES`` of features, a multiple of the prediction batch (so
    that each Keras batch holds the rows it holds when the split is predicted at once). The windows are the same
    whoever predicted the rows (here, or shards elsewhere), and so are the figures summed over them."""
    return max(batch_size, WINDOW_BYTES // max(1, row_bytes) // batch_size * batch_size)


class _Head:
    """The first rows of the test split a model ran (at most a batch): its latency and a rerun are measured on them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._features: list[np.ndarray] = []
        self._outputs: list[np.ndarray] = []
        self.rows = 0

    def add(self, features: np.ndarray, outputs: np.ndarray) -> None:
        wanted = self.size - self.rows
        if wanted > 0 and len(features):
            self._features.append(features[:wanted])
            self._outputs.append(outputs[:wanted])
            self.rows += len(features[:wanted])

    @property
    def features(self) -> np.ndarray:
        return np.concatenate(self._features)

    @property
    def outputs(self) -> np.ndarray:
        return np.concatenate(self._outputs)


REFUSED_EVERYTHING = "refused every test sample"


@dataclass(frozen=True)
class Judged:
    """Another ``.tflite`` judged as validation judges the shipped one: on the test samples it can run."""

    figures: TaskFigures | None  # None: it refused every sample
    latency_ms_p50: float | None

    @property
    def fidelity(self) -> str:
        return fidelity_in_words(self.figures) if self.figures is not None else REFUSED_EVERYTHING


@dataclass(frozen=True)
class _Other:
    """Another ``.tflite`` (the all-int8 model mixed16 started from, the model before a repair), judged on the same
    windows: its figures against the float model, on the rows it runs."""

    model_bytes: bytes
    predictor: TflitePredictor
    sums: TaskSums
    head: _Head


class Evaluation:
    """``evaluate_models``, window by window of the test split (``window_rows``): each window's rows are predicted
    (or their predictions read, when shards made them), summed into every figure, and let go. What is kept is
    bounded: the sums, the first batch of rows (latency, the rerun), and with a TFLite Micro target its drawn rows'
    labels and float outputs (``--tflm-samples``)."""

    def __init__(
        self,
        keras_model: keras.Model,
        float_tflite: bytes,
        quantized_tflite: bytes,
        params: ValidationParameters,
        rows: int,
        class_names: list[str] | None = None,
        task: ModelTask = ModelTask.classification,
        others: dict[str, bytes] | None = None,
    ) -> None:
        self.keras_model, self.float_tflite, self.quantized_tflite = keras_model, float_tflite, quantized_tflite
        self.params, self.rows, self.task, self.class_names = params, rows, task, class_names
        self.inputs = model_input_slots(keras_model)
        self.layout = model_outputs(keras_model)
        self.audit = audit_tensor_types(quantized_tflite)
        float_audit = audit_tensor_types(float_tflite)
        self.flex = sorted(set(self.audit.flex_ops) | set(float_audit.flex_ops))
        self._predictors: dict[ModelKind, TflitePredictor] = {}
        self._all_keras = ModelSums(self.layout)  # every row: what a report without LiteRT figures gives
        self._ran = {kind: ModelSums(self.layout) for kind in ModelKind}  # the rows both .tflite files ran
        self._refused: dict[ModelKind, list[RowFailure]] = {ModelKind.float_tflite: [], ModelKind.quantized_tflite: []}
        self._head = _Head(params.batch_size)
        self._others = {
            name: _Other(
                model,
                TflitePredictor(model, params.batch_size, params.num_threads, self.inputs, rows),
                TaskSums(task, self.layout),
                _Head(params.batch_size),
            )
            for name, model in (others or {}).items()
            if not self.flex
        }
        self._tflm_draw: np.ndarray | None = None
        self._tflm_seed: int | None = None
        if DeviceTarget.tflm in params.targets and not self.flex:
            self._tflm_draw, self._tflm_seed = tflm_rows(rows, params.tflm_samples)
        self._tflm_parts: list[TflmRows] = []
        self._tflm_labels: list[np.ndarray] = []
        self._tflm_reference: list[np.ndarray] = []
        self._no_rows: np.ndarray | None = None

    def _predictor(self, kind: ModelKind) -> TflitePredictor:
        if kind not in self._predictors:
            model = self.float_tflite if kind is ModelKind.float_tflite else self.quantized_tflite
            params = self.params
            predictor = TflitePredictor(model, params.batch_size, params.num_threads, self.inputs, self.rows)
            self._predictors[kind] = predictor
        return self._predictors[kind]

    def _predicted(self, start: int, features: np.ndarray, keras_outputs: np.ndarray | None) -> Predictions:
        """The window's predictions, made here: refused calls counted from the window's first row."""

        def progress(model_name: str):
            def reported(done: int) -> None:
                done += start
                report("validate_with_interpreter", f"{model_name}: {done}/{self.rows} samples", done, self.rows)

            return reported

        keras_out = (
            predict_keras(self.keras_model, features, self.params.batch_size, self.inputs)
            if keras_outputs is None
            else keras_outputs
        )
        if self.flex:  # the Python LiteRT Interpreter cannot run them
            return Predictions(keras_out, keras_out[:0], keras_out[:0])
        refused: dict[ModelKind, list[RowFailure]] = {ModelKind.float_tflite: [], ModelKind.quantized_tflite: []}
        float_out = self._predictor(ModelKind.float_tflite).predict(
            features, progress("float .tflite"), refused[ModelKind.float_tflite]
        )
        quant_out = self._predictor(ModelKind.quantized_tflite).predict(
            features, progress("quantized .tflite"), refused[ModelKind.quantized_tflite]
        )
        return Predictions(
            keras_out,
            float_out,
            quant_out,
            tuple(refused[ModelKind.float_tflite]),
            tuple(refused[ModelKind.quantized_tflite]),
        )

    def add(
        self,
        start: int,
        features: np.ndarray,
        labels: np.ndarray,
        predicted: Predictions | None = None,
        keras_outputs: np.ndarray | None = None,
    ) -> None:
        """Test rows ``start`` to ``start + len(features)`` (a window: ``window_rows``, the last shorter), with their
        predictions when made elsewhere (``predicted``: refused calls counted from the window's first row), or the
        float model's outputs when known (``keras_outputs``)."""
        if self._no_rows is None:
            self._no_rows = features[:0]
        if predicted is None:
            predicted = self._predicted(start, features, keras_outputs)
        keras_out = predicted.keras
        self._all_keras.add(keras_out, keras_out, labels)
        if self.flex:
            return
        for kind, failures in (
            (ModelKind.float_tflite, predicted.float_refused),
            (ModelKind.quantized_tflite, predicted.quantized_refused),
        ):
            self._refused[kind] += [replace(f, start=f.start + start, stop=f.stop + start) for f in failures]
        float_out, quant_out = predicted.float_tflite, predicted.quantized_tflite
        ran = ~(refused_rows(float_out) | refused_rows(quant_out))
        mine, ran_labels, ran_keras = features[ran], labels[ran], keras_out[ran]
        self._ran[ModelKind.float_keras].add(ran_keras, ran_keras, ran_labels)
        self._ran[ModelKind.float_tflite].add(float_out[ran], ran_keras, ran_labels)
        self._ran[ModelKind.quantized_tflite].add(quant_out[ran], ran_keras, ran_labels)
        self._head.add(mine, quant_out[ran])
        for other in self._others.values():
            outputs = other.predictor.predict(features, failures=[])
            runs = ~refused_rows(outputs)
            other.sums.add(keras_out[runs], outputs[runs], labels[runs])
            other.head.add(features[runs], outputs[runs])
        if self._tflm_draw is not None:
            self._add_tflm(start, features, labels, predicted)

    def _add_tflm(self, start: int, features: np.ndarray, labels: np.ndarray, predicted: Predictions) -> None:
        assert self._tflm_draw is not None
        stop = start + len(features)
        drawn = self._tflm_draw[(self._tflm_draw >= start) & (self._tflm_draw < stop)]
        self._tflm_labels.append(labels[drawn - start])
        self._tflm_reference.append(predicted.keras[drawn - start].reshape(len(drawn), -1))
        if predicted.tflm is not None:
            self._tflm_parts.append(predicted.tflm)
        elif len(drawn) and not any(part.refusal for part in self._tflm_parts):  # TFLM stops at its first refusal
            report("validate_with_interpreter", "running the test split on TensorFlow Lite Micro")
            litert = predicted.quantized_tflite[drawn - start]
            whole = start == 0 and stop == self.rows  # one window: the arena is measured with the outputs
            self._tflm_parts.append(
                tflm_on_rows(self.quantized_tflite, features[drawn - start], drawn, self.inputs, litert, arena=whole)
            )

    def _names(self) -> list[str]:
        if self.task is not ModelTask.classification:
            return []
        return self.class_names or [str(i) for i in range(self._all_keras.classes.largest_label + 1)]

    def metrics(self, measure_speed: bool = True) -> ValidationMetrics:
        """Every figure of the validation report but the per-layer and device ones. A model with TensorFlow (Flex)
        ops cannot run in the Python LiteRT Interpreter: it is reported as not validated, with its audit, never as
        a pass."""
        params, names = self.params, self._names()
        classification = self.task is ModelTask.classification
        num_threads = params.num_threads or os.cpu_count() or 1
        device = {
            ModelKind.float_tflite: device_footprint(self.float_tflite),
            ModelKind.quantized_tflite: device_footprint(self.quantized_tflite),
        }
        keras_all = self._all_keras
        common = ValidationMetrics(
            samples=self.rows,
            task=self.task,
            class_names=names,
            float_accuracy=keras_all.accuracy() if classification else None,
            float_mae=keras_all.mae() if self.task is ModelTask.regression else None,
            float_bytes=len(self.float_tflite),
            quantized_bytes=len(self.quantized_tflite),
            size_ratio=round(len(self.float_tflite) / len(self.quantized_tflite), 4),
            num_threads=num_threads,
            audit=self.audit,
            validated=False,
            not_validated_reason=None,
            tflite_float_accuracy=None,
            quantized_accuracy=None,
            accuracy_drop_pp=None,
            agreement=None,
            rerun_max_difference=None,
            models={ModelKind.float_keras: keras_all.metrics(names)},
            device=device,
        )
        if self.flex:
            return common.model_copy(
                update={
                    "not_validated_reason": (
                        f"the model uses TensorFlow (Flex) ops ({', '.join(self.flex)}), which the Python LiteRT "
                        "Interpreter cannot run: validate it on a runtime linked with the Flex delegate, or replace "
                        "those ops"
                    )
                }
            )
        unrunnable = tuple(
            found
            for kind, rows in self._refused.items()
            if (found := unrunnable_samples(kind.value, rows, self.rows)) is not None
        )
        keras_ran = self._ran[ModelKind.float_keras]
        if unrunnable:
            # Judged on the rows every model ran; the gate weighs the others (--max-unrunnable-fraction).
            common = common.model_copy(
                update={"unrunnable": unrunnable, "unrunnable_rows": self.rows - self._rows_ran()}
            )
            if not self._rows_ran():
                return common.model_copy(
                    update={"not_validated_reason": f"no test sample ran on both .tflite models: {refusals(common)}"}
                )
            common = common.model_copy(
                update={
                    "samples": self._rows_ran(),
                    "float_accuracy": keras_ran.accuracy() if classification else None,
                    "float_mae": keras_ran.mae() if self.task is ModelTask.regression else None,
                }
            )
        speeds = {}
        head = self._head.features
        if measure_speed:
            report("validate_with_interpreter", "measuring latency and throughput")
            speeds = {
                ModelKind.float_keras: keras_speed(self.keras_model, head, params.batch_size, inputs=self.inputs),
                ModelKind.float_tflite: tflite_speed(
                    self.float_tflite, head, params.batch_size, num_threads, inputs=self.inputs
                ),
                ModelKind.quantized_tflite: tflite_speed(
                    self.quantized_tflite, head, params.batch_size, num_threads, inputs=self.inputs
                ),
            }
        sizes = {
            ModelKind.float_keras: None,
            ModelKind.float_tflite: len(self.float_tflite),
            ModelKind.quantized_tflite: len(self.quantized_tflite),
        }
        models = {kind: self._ran[kind].metrics(names, sizes[kind], speeds.get(kind)) for kind in ModelKind}
        quantized = models[ModelKind.quantized_tflite]
        float_accuracy, float_mae = common.float_accuracy, common.float_mae
        return common.model_copy(
            update={
                "validated": True,
                "tflite_float_accuracy": models[ModelKind.float_tflite].accuracy,
                "quantized_accuracy": quantized.accuracy,
                "accuracy_drop_pp": round((float_accuracy - quantized.accuracy) * 100, 6)
                if float_accuracy is not None and quantized.accuracy is not None
                else None,
                "agreement": quantized.agreement_with_float,
                "tflite_float_mae": models[ModelKind.float_tflite].mae,
                "quantized_mae": quantized.mae,
                "mae_increase_pct": increase_pct(float_mae, quantized.mae)
                if float_mae is not None and quantized.mae is not None
                else None,
                "sqnr_db": worst_sqnr(quantized.outputs),
                "outputs": quantized.outputs,
                "rerun_max_difference": rerun_max_difference(
                    self.quantized_tflite, head, self._head.outputs, params.batch_size, params.num_threads, self.inputs
                ),
                "models": models,
            }
        )

    def _rows_ran(self) -> int:
        """How many rows both ``.tflite`` files ran."""
        return self._ran[ModelKind.float_keras].rows

    def judged(self, name: str) -> Judged:
        """Another model (``others``) judged on the rows it can run: its task figures against the float model and
        its latency."""
        other = self._others.get(name)
        if other is None or not other.sums.rows:  # (None: a model with Flex ops, which the interpreter cannot run)
            return Judged(None, None)
        num_threads = self.params.num_threads or os.cpu_count() or 1
        speed = tflite_speed(
            other.model_bytes, other.head.features, self.params.batch_size, num_threads, inputs=self.inputs
        )
        return Judged(other.sums.figures(), speed.latency_ms.p50)

    def tflm_figures(self) -> TflmFigures:
        """The quantized model on TFLite Micro (``tasks.evaluation.tflm``): its arena, and its figures on the drawn
        rows it ran."""
        assert self._tflm_draw is not None and self._no_rows is not None, "TFLM is not a target of this validation"
        ran = TflmRows.joined(self._tflm_parts)
        drawn_labels, drawn_reference = np.concatenate(self._tflm_labels), np.concatenate(self._tflm_reference)
        at = np.searchsorted(self._tflm_draw, ran.rows)
        return figures_on_tflm(
            self.quantized_tflite,
            ran,
            drawn_labels[at],
            drawn_reference[at],
            self.task,
            self.layout,
            self.inputs,
            self._tflm_seed,
            self._no_rows,
        )


def evaluate_models(
    keras_model: keras.Model,
    float_tflite: bytes,
    quantized_tflite: bytes,
    features: np.ndarray,
    labels: np.ndarray,
    params: ValidationParameters,
    class_names: list[str] | None = None,
    measure_speed: bool = True,
    keras_outputs: np.ndarray | None = None,
    task: ModelTask = ModelTask.classification,
    predictions: Predictions | None = None,
) -> ValidationMetrics:
    """Pure stage function: every figure of the validation report but the per-layer and device ones, for a test
    split in memory (the validate stage reads its split window by window: ``Evaluation``). ``keras_outputs``, the
    float Keras model's outputs on ``features`` when they are known already, saves predicting them again;
    ``predictions``, all three models' (``tasks.evaluation.shards``, made elsewhere), saves predicting at all."""
    evaluation = Evaluation(keras_model, float_tflite, quantized_tflite, params, len(features), class_names, task)
    window = window_rows(features[:1].nbytes, params.batch_size)
    for start in range(0, len(features), window):
        stop = min(start + window, len(features))
        evaluation.add(
            start,
            features[start:stop],
            labels[start:stop],
            predictions.rows(start, stop) if predictions is not None else None,
            keras_outputs[start:stop] if keras_outputs is not None else None,
        )
    return evaluation.metrics(measure_speed)


def npu_compilations(quantized_tflite: bytes, params: ValidationParameters) -> list[VelaCompilation]:
    """The quantized model compiled by Vela for each Ethos-U the run names (``tasks.evaluation.vela``)."""
    compilations = []
    for target in params.npu_targets:
        report("validate_with_interpreter", f"compiling for {target.value} with Vela")
        compilations.append(
            compile_for_npu(quantized_tflite, target, params.vela_system_config, params.vela_memory_mode)
        )
    return compilations


def per_layer_errors(
    keras_model: keras.Model, calibration: np.ndarray, options: ConversionParameters, batch_size: int
) -> tuple[list[LayerError], str | None]:
    """The debugger's per-layer figures for this conversion, or why there are none."""

    def batches():
        for start in range(0, len(calibration), batch_size):
            yield calibration[start : start + batch_size]

    try:
        return layer_errors(keras_model, batches, calibration, options), None
    except Exception as error:  # the debugger's failures are the converter's (e.g. Flex ops): report, not fail
        return [], f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def repair_cost(repair: RepairResult, unrepaired: bytes, before: Judged, metrics: ValidationMetrics) -> RepairCost:
    """What keeping layers in float cost and gained: the task's figure, size and latency of the repaired model
    against the fully quantized one (``unrepaired``, judged on the test split: ``before``)."""
    repaired: ModelMetrics | None = metrics.models.get(ModelKind.quantized_tflite)
    return RepairCost(
        **repair.model_dump(mode="json", exclude={"repaired", "unrepaired", "mixed"}),
        unrepaired_accuracy=before.figures.quantized_accuracy if before.figures is not None else None,
        repaired_accuracy=metrics.quantized_accuracy,
        unrepaired_fidelity=before.fidelity,
        repaired_fidelity=fidelity_in_words(metrics),
        unrepaired_model=repair.unrepaired,
        unrepaired_bytes=len(unrepaired),
        repaired_bytes=metrics.quantized_bytes,
        unrepaired_latency_ms_p50=before.latency_ms_p50,
        repaired_latency_ms_p50=repaired.speed.latency_ms.p50 if repaired and repaired.speed else None,
    )


def mixed_cost(
    choice: MixedPrecisionChoice, int8_bytes: bytes, int8: Judged, metrics: ValidationMetrics, mixed_bytes: bytes
) -> MixedPrecisionCost:
    """What scheme mixed16's int16 layers cost and gained against the all-int8 model the search started from
    (``int8_bytes``, judged on the test split: ``int8``): fidelity and latency, and the arena TFLM's own allocator
    records for each file."""
    from ptqflow.tasks.evaluation.tflm import TflmCannotRun, recorded_arena

    arenas: list[int | None] = [None, None]
    unavailable = None
    try:
        arenas = [recorded_arena(model).recorded_bytes for model in (int8_bytes, mixed_bytes)]
    except ImportError:
        unavailable = "TensorFlow Lite Micro is not installed here (its wheel is for Linux x86-64)"
    except TflmCannotRun as error:
        unavailable = f"TFLM cannot allocate the model: {error}"
    mixed = metrics.models.get(ModelKind.quantized_tflite)
    return MixedPrecisionCost(
        choice=choice,
        int8_fidelity=int8.fidelity,
        mixed_fidelity=fidelity_in_words(metrics),
        int8_bytes=len(int8_bytes),
        mixed_bytes=len(mixed_bytes),
        int8_latency_ms_p50=int8.latency_ms_p50,
        mixed_latency_ms_p50=mixed.speed.latency_ms.p50 if mixed and mixed.speed else None,
        int8_arena_bytes=arenas[0],
        mixed_arena_bytes=arenas[1],
        arena_unavailable=unavailable,
    )

"""Conversion with 1000 calibration samples: batches streamed from Parquet (ptqflow) vs a batch-1 generator over
an in-memory tf.data pipeline (the seed tutorial), on the default CNN. Same quantization parameters required."""

from __future__ import annotations

import io

import numpy as np

from benchmarks.common import Result, digits_model_and_splits, median_seconds

SAMPLES = 1000
BATCH = 100  # ptqflow's streaming batch for this benchmark (the default is 64)


def quantization_parameters(model_bytes: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from ptqflow.tasks.evaluation.interpreter import make_interpreter

    return {
        d["name"]: (d["quantization_parameters"]["scales"], d["quantization_parameters"]["zero_points"])
        for d in make_interpreter(model_bytes, 1).get_tensor_details()
    }


def same_quantization(a: bytes, b: bytes) -> bool:
    pa, pb = quantization_parameters(a), quantization_parameters(b)
    if pa.keys() != pb.keys():
        return False
    for name in pa:
        if not np.array_equal(pa[name][1], pb[name][1]):
            return False
        # Float accumulation order differs with the batch size: scales agree to a few ulps.
        if not np.allclose(pa[name][0], pb[name][0], rtol=1e-5, atol=0):
            return False
    return True


def _compare(label: str, model, features: np.ndarray, labels: np.ndarray, repeats: int) -> Result:
    import tensorflow as tf

    from ptqflow.storage.tables import TensorTable, iter_feature_batches, write_parquet_bytes
    from ptqflow.tasks.core.parameters import ConversionParameters
    from ptqflow.tasks.quantization.converter import quantize

    calibration = TensorTable(features[:SAMPLES], labels[:SAMPLES])
    parquet = write_parquet_bytes(calibration)
    options = ConversionParameters()

    def ours() -> bytes:
        return quantize(model, lambda: iter_feature_batches(io.BytesIO(parquet), BATCH), options)

    # The tutorial: the whole array in memory, tf.data, one sample per calibration step.
    in_memory = tf.data.Dataset.from_tensor_slices(calibration.features.astype(np.float32)).batch(1)

    def seed_way() -> bytes:
        def representative_dataset():
            for sample in in_memory.take(SAMPLES):
                yield [sample]

        return quantize(model, lambda: (batch.numpy() for [batch] in representative_dataset()), options)

    same = same_quantization(ours(), seed_way())  # the first calls also warm up tracing for both
    ours_s, ours_all = median_seconds(ours, repeats)
    seed_s, seed_all = median_seconds(seed_way, repeats)
    ratio = seed_s / ours_s
    return Result(
        name=f"calibration_{label.split()[0].lower()}",
        metric=f"conversion with {SAMPLES} calibration samples, default CNN on {label}",
        unit="s",
        ours=ours_s,
        baseline=seed_s,
        ratio=ratio,
        target=">= 1.5x faster, same quantization parameters",
        met=ratio >= 1.5 and same,
        ours_label=f"batches of {BATCH} streamed from Parquet",
        baseline_label="batch-1 generator over in-memory tf.data",
        detail={"same_quantization_parameters": same, "ours_runs_s": ours_all, "baseline_runs_s": seed_all},
    )


def run(repeats: int = 3) -> list[Result]:
    from benchmarks.storage import synthetic_images
    from ptqflow.tasks.core.artifacts import FeatureSpec
    from ptqflow.tasks.models.training import build_default_cnn, seeded

    model, splits = digits_model_and_splits()
    results = [_compare("digits (8x8x1)", model, splits["train"].features, splits["train"].labels, repeats)]
    # The tutorial's own input size: the default CNN for 28x28x1 uint8 images (MNIST-sized; the weights do not
    # change what calibration costs, so they are left as initialised).
    spec = FeatureSpec(
        shape=(28, 28, 1),
        dtype="uint8",
        value_range=(0.0, 255.0),
        n_classes=10,
        class_names=tuple(str(i) for i in range(10)),
    )
    with seeded(0):
        mnist_sized = build_default_cnn(spec)
    images = synthetic_images(SAMPLES)
    results.append(_compare("MNIST-sized images (28x28x1)", mnist_sized, images, np.zeros(SAMPLES, np.int64), repeats))
    return results

"""Files in Keras's own cache format (what ``keras.datasets`` downloads), written small by the tests, so the real
loaders run without a network."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def images_by_class(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Learnable images: class ``c`` is a bright band at a class-specific place, plus seeded noise."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, (len(labels), *shape), dtype=np.uint8)
    band = max(1, shape[0] // 10)
    for c in np.unique(labels):
        images[labels == c, c * band : (c + 1) * band] = 250
    return images


def write_mnist(datasets_dir: Path, n_train: int = 300, n_test: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``mnist.npz`` as Keras caches it: x_train (n, 28, 28) uint8, y_train uint8, x_test, y_test."""
    labels = (np.arange(n_train + n_test) % 10).astype(np.uint8)
    images = images_by_class(labels, (28, 28))
    datasets_dir.mkdir(parents=True, exist_ok=True)
    np.savez(
        datasets_dir / "mnist.npz",
        x_train=images[:n_train],
        y_train=labels[:n_train],
        x_test=images[n_train:],
        y_test=labels[n_train:],
    )
    return images, labels


def write_fashion_mnist(datasets_dir: Path, n_train: int = 300, n_test: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The four gzipped IDX files under ``fashion-mnist/``, with their big-endian magic numbers and counts."""
    labels = (np.arange(n_train + n_test) % 10).astype(np.uint8)
    images = images_by_class(labels, (28, 28))
    folder = datasets_dir / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in (("train", slice(0, n_train)), ("t10k", slice(n_train, None))):
        count = len(labels[rows])
        (folder / f"{part}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", 2049, count) + labels[rows].tobytes())
        )
        (folder / f"{part}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">IIII", 2051, count, 28, 28) + images[rows].tobytes())
        )
    return images, labels


CIFAR_BATCH = 10_000  # keras.datasets.cifar10 reads exactly five training batches of this size, and a test batch


def write_cifar10(datasets_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``cifar-10-python.tar.gz`` saved where Keras keeps it: pickled dicts of channel-first rows, 60,000 samples
    (Keras's loader hard-codes the batch sizes, so this one cannot be small)."""
    labels = (np.arange(6 * CIFAR_BATCH) % 10).astype(np.uint8)
    images = images_by_class(labels, (32, 32, 3))
    channel_first = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for i, name in enumerate(names):
            rows = slice(i * CIFAR_BATCH, (i + 1) * CIFAR_BATCH)
            payload = pickle.dumps(
                {b"data": channel_first[rows], b"labels": labels[rows].tolist(), b"batch_label": name.encode()},
                protocol=4,
            )
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    datasets_dir.mkdir(parents=True, exist_ok=True)
    (datasets_dir / "cifar-10-batches-py-target_archive").write_bytes(buffer.getvalue())
    return images, labels


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

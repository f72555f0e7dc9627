"""Image folders as a data source: ``URL/<class>/<image>`` (the Keras ``image_dataset_from_directory`` layout), at
any fsspec URL. Class names are the folder names, sorted; labels their positions.

Only the listing is read to draw a sample (labels come from the paths), then only the drawn files are fetched and
decoded, by a pool of threads (the JPEG decoder and the local reads release the GIL), straight into one uint8
array.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ptqflow.storage.images import IMAGE_SUFFIXES, IMAGES_PER_TASK, UndecodableImage, decode_image
from ptqflow.storage.store import file_bytes
from ptqflow.storage.tables import Columns
from ptqflow.tasks.core.errors import InvalidDataset
from ptqflow.tasks.data.splits import SPLITS, split_codes, split_named


@dataclass(frozen=True)
class ImageFolder:
    """A listed image folder: every image's path and label, and the class names; ``splits`` (codes into
    ``tasks.data.splits.SPLITS``) when the folder is ``URL/<split>/<class>/<image>``."""

    fs: fsspec.AbstractFileSystem
    url: str
    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    splits: np.ndarray | None = None
    split_origin: dict[str, str] = field(default_factory=dict)


def is_image_folder(files: Sequence[str]) -> bool:
    """A directory listing (every file below it) that holds images and no Parquet file."""
    return any(f.lower().endswith(IMAGE_SUFFIXES) for f in files) and not any(f.endswith(".parquet") for f in files)


def _subfolders(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))


def _class_folders(
    fs: fsspec.AbstractFileSystem, root: str, shown: str, images: list[str], folders: list[str]
) -> dict[str, list[str]]:
    """The images of each class folder directly below ``root`` (``shown``: its URL in errors), refusing strays
    and empty classes."""
    stray = [f for f in images if "/" not in posixpath.relpath(f, root)]
    if stray:
        raise InvalidDataset(
            f"{fs.unstrip_protocol(stray[0])} is not in a class folder: put each image in a folder named after its "
            f"class ({shown}/<class>/<image>)"
        )
    by_class = {name: [f for f in images if posixpath.relpath(f, root).split("/", 1)[0] == name] for name in folders}
    empty = [name for name, files in by_class.items() if not files]
    if empty:
        raise InvalidDataset(
            f"class folder {shown}/{empty[0]} has no images ({', '.join(IMAGE_SUFFIXES)}): add some, or remove "
            "the folder"
        )
    return by_class


def list_image_folder(
    fs: fsspec.AbstractFileSystem,
    path: str,
    url: str,
    files: Sequence[str],
    since: datetime | None = None,
    modified_at: Callable[[fsspec.AbstractFileSystem, str], datetime] | None = None,
    given_splits: bool = True,
) -> ImageFolder:
    """Every image under ``path``'s class folders (``files``: every file below it, as listed; with ``since``, the
    images ``modified_at`` since), sorted by path. When every folder below ``path`` names a split (train,
    validation, test, ...) and ``given_splits``, the classes are the folders below those, and each image keeps its
    split; with ``given_splits`` False such a folder is one source whose classes are the folders below the splits.

    Raises:
        InvalidDataset: an image outside a class folder, or a class folder without images.
    """
    root = path.rstrip("/")
    images = sorted(f for f in files if f.lower().endswith(IMAGE_SUFFIXES))
    top = _subfolders(fs, root)
    split_folders = [name for name in top if split_named(name)] if top else []
    nested = all(posixpath.relpath(f, root).count("/") >= 2 for f in images)  # <split>/<class>/<image>
    if given_splits and split_folders and len(split_folders) < len(top):
        # Split folders holding class folders, beside folders that are not splits: read as classes, train/ would
        # be one class of every training image. Refused: the layout is one or the other.
        holding_classes = [
            name
            for name in split_folders
            if any(
                posixpath.relpath(f, root).startswith(f"{name}/") and posixpath.relpath(f, root).count("/") >= 2
                for f in images
            )
        ]
        if holding_classes:
            others = [name for name in top if name not in split_folders]
            raise InvalidDataset(
                f"{url} mixes split folders holding class folders ({', '.join(f'{n}/' for n in holding_classes)}) "
                f"with other folders ({', '.join(f'{n}/' for n in others[:3])}): put every class folder under the "
                "split folders, or pass --splits resplit to read every top folder as a class"
            )
    if split_folders and len(split_folders) == len(top) and nested:
        by_split = {
            name: _class_folders(
                fs,
                f"{root}/{name}",
                f"{url.rstrip('/')}/{name}",
                [f for f in images if posixpath.relpath(f, root).split("/", 1)[0] == name],
                _subfolders(fs, f"{root}/{name}"),
            )
            for name in split_folders
        }
        class_names = tuple(sorted({c for classes in by_split.values() for c in classes}))
        rows = [
            (f, class_names.index(c), split_named(name))
            for name, classes in by_split.items()
            for c, found in classes.items()
            for f in found
        ]
        splits_given = given_splits and {split for _, _, split in rows} != {"train"}
    else:
        by_class = _class_folders(fs, root, url.rstrip("/"), images, top)
        class_names = tuple(by_class)
        rows = [(f, i, None) for i, name in enumerate(class_names) for f in by_class[name]]
        splits_given = False
    if since is not None and modified_at is not None:
        rows = [row for row in rows if modified_at(fs, row[0]) >= since]
    rows.sort(key=lambda row: row[0])
    paths = tuple(f for f, _, _ in rows)
    labels = np.array([label for _, label, _ in rows], np.int64)
    if not splits_given:
        return ImageFolder(fs, url, paths, labels, class_names)
    names = [str(split) for _, _, split in rows]
    origin = {
        split: ", ".join(f"folder {name}/" for name in split_folders if split_named(name) == split)
        for split in SPLITS
        if split in names
    }
    return ImageFolder(fs, url, paths, labels, class_names, split_codes(names), origin)


def _decode(fs: fsspec.AbstractFileSystem, path: str, columns: Columns, into: np.ndarray | None = None) -> np.ndarray:
    try:
        return decode_image(
            file_bytes(fs, path), columns.image_size, columns.color_mode, name=path.rsplit("/", 1)[-1], into=into
        )
    except UndecodableImage as error:
        raise InvalidDataset(
            f"{fs.unstrip_protocol(path)} cannot be decoded as an image ({error}): replace or remove it"
        ) from None


def decode_images(
    folder: ImageFolder,
    chosen: np.ndarray,
    columns: Columns,
    threads: int | None = None,
    before_allocating: Callable[[tuple[int, ...]], None] | None = None,
) -> np.ndarray:
    """The images at positions ``chosen`` of ``folder``, decoded in parallel into one ``(n, H, W, C)`` uint8 array;
    ``before_allocating`` sees one image's shape (from the first one decoded) before the array is allocated.

    Raises:
        InvalidDataset: an image that cannot be decoded (named), or images of different sizes or colour modes
            without ``--image-size`` / ``--color-mode``.
    """
    paths = [folder.paths[i] for i in chosen]
    if not paths:
        raise InvalidDataset(f"no images to read under {folder.url}")
    first = _decode(folder.fs, paths[0], columns)
    if before_allocating is not None:
        before_allocating(first.shape)
    images = np.empty((len(paths), *first.shape), np.uint8)
    images[0] = first

    def place_all(positions: range) -> None:
        for position in positions:
            slot = images[position]
            pixels = _decode(folder.fs, paths[position], columns, into=slot)
            if pixels is not slot:  # decoded into the array when it has the first image's shape
                height, width, channels = pixels.shape
                raise InvalidDataset(
                    f"images of different sizes or colour modes: {folder.fs.unstrip_protocol(paths[0])} is "
                    f"{first.shape[0]}x{first.shape[1]}x{first.shape[2]}, "
                    f"{folder.fs.unstrip_protocol(paths[position])} is {height}x{width}x{channels}: pass "
                    "--image-size H,W (and --color-mode rgb|grayscale)"
                )

    if threads is None:
        # A local file is read in microseconds, so one thread per core; a remote one waits on the network, so more.
        cores = os.cpu_count() or 1
        threads = cores if isinstance(folder.fs, LocalFileSystem) else min(8, cores * 2)
    if threads == 1:
        place_all(range(1, len(paths)))
        return images
    runs = [range(start, min(start + IMAGES_PER_TASK, len(paths))) for start in range(1, len(paths), IMAGES_PER_TASK)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(place_all, runs))
    return images


def image_metadata(folder: ImageFolder, sample_shape: Sequence[int]) -> dict:
    return {"class_names": list(folder.class_names), "value_range": [0.0, 255.0], "shape": list(sample_shape)}

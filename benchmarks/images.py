"""Image folders: decode throughput of a 20,000-JPEG folder (64x64 RGB, 10 classes) with ptqflow's thread pool
against one thread, in the same run; and the peak RSS of a 1,000-image calibration draw from that folder, against
decoding the whole folder, each in a fresh process above its own baseline (the RSS after imports)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from benchmarks.common import Result, json_from_fresh_process, median_seconds, rss_bytes

IMAGES = 20_000
CLASSES = 10
SIZE = 64
DRAW = 1000
THROUGHPUT_TARGET = 1.6
MEMORY_LIMIT_BYTES = 2**30


def write_folder(root: str) -> None:
    """``root/class_<k>/<n>.jpg``: noise with a class-specific bright block, JPEG quality 90."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(CLASSES):
        os.makedirs(os.path.join(root, f"class_{k}"), exist_ok=True)
    for n in range(IMAGES):
        k = n % CLASSES
        pixels = rng.integers(0, 120, (SIZE, SIZE, 3), dtype=np.uint8)
        pixels[(k % 4) * 16 : (k % 4) * 16 + 16, (k // 4) * 16 : (k // 4) * 16 + 16] = 240
        Image.fromarray(pixels).save(os.path.join(root, f"class_{k}", f"{n:05d}.jpg"), quality=90)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def hold(root: str, mode: str) -> dict:
    """In this process: note the baseline RSS, then draw 1,000 images (ptqflow) or decode them all."""
    from ptqflow.tasks.data.calibration import calibration_seed
    from ptqflow.tasks.data.datasets import Draw, load_dataset

    baseline = rss_bytes()
    # The process's peak so far is the imports' (TensorFlow's is far above this work's): reset it (Linux), so the
    # peak read afterwards is this work's.
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
    draw = Draw(DRAW, calibration_seed(0), what="calibration set") if mode == "draw" else None
    table = load_dataset(root, draw=draw)
    return {"mode": mode, "images": len(table), "above_baseline": _peak_rss_bytes() - baseline}


def run(repeats: int = 3) -> list[Result]:
    from ptqflow.storage.store import filesystem_for
    from ptqflow.storage.tables import Columns
    from ptqflow.tasks.data.images import decode_images, list_image_folder

    with tempfile.TemporaryDirectory(prefix="ptqflow-bench-") as tmp:
        root = os.path.join(tmp, "images")
        write_folder(root)
        fs, path = filesystem_for(root)
        folder = list_image_folder(fs, path, root, sorted(fs.find(path)))
        everything = np.arange(len(folder.paths))

        def decode(threads: int | None):
            return lambda: decode_images(folder, everything, Columns(), threads=threads)

        one, one_runs = median_seconds(decode(1), repeats, warmup=1)
        pool, pool_runs = median_seconds(decode(None), repeats, warmup=1)
        drawn = json_from_fresh_process("benchmarks.images", "--hold", root, "--mode", "draw")
        whole = json_from_fresh_process("benchmarks.images", "--hold", root, "--mode", "whole")

    ours_rate, baseline_rate = IMAGES / pool, IMAGES / one
    throughput = Result(
        name="image folder decode",
        metric=f"decode {IMAGES:,} {SIZE}x{SIZE} RGB JPEGs of an image folder",
        unit="images/s",
        ours=round(ours_rate, 1),
        baseline=round(baseline_rate, 1),
        ratio=round(ours_rate / baseline_rate, 2),
        target=f">= {THROUGHPUT_TARGET}x",
        met=ours_rate / baseline_rate >= THROUGHPUT_TARGET,
        ours_label=f"thread pool ({os.cpu_count()} cores)",
        baseline_label="one thread",
        detail={"images": IMAGES, "size": f"{SIZE}x{SIZE}x3 JPEG", "pool_runs_s": pool_runs, "one_runs_s": one_runs},
    )
    mib = 2**20
    memory = Result(
        name="image folder calibration draw",
        metric=f"peak RSS above baseline, a {DRAW:,}-image calibration draw from that folder",
        unit="MiB",
        ours=round(drawn["above_baseline"] / mib, 1),
        baseline=round(whole["above_baseline"] / mib, 1),
        ratio=round(whole["above_baseline"] / max(drawn["above_baseline"], 1), 2),
        target="< 1 GiB",
        met=drawn["above_baseline"] < MEMORY_LIMIT_BYTES,
        ours_label=f"draw {DRAW} images",
        baseline_label=f"decode all {IMAGES}",
        detail={"drawn": drawn, "whole": whole},
    )
    return [throughput, memory]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--hold")
    parser.add_argument("--mode", choices=("draw", "whole"))
    args = parser.parse_args()
    if args.hold:
        print(json.dumps(hold(args.hold, args.mode)))
    else:
        print(json.dumps([r.as_dict() for r in run()], indent=2))

"""Images/s through the full training data pipeline: local disk vs S3 and GCS servers.

Starts moto_server and the GCS emulator on 127.0.0.1 (the same helpers the tests use), uploads a
drawn-shapes data set, builds the training dataset of ``model_def/configs/shapes_faster_rcnn.py``
(LoadImageFromFile, LoadAnnotations, Resize, RandomFlip, PackDetInputs) for each source and times
two epochs through a DataLoader, with ``num_workers`` 0 and 2. The object-store sources use an image
cache (``data.cache_dir``), so their second epoch reads local disk; the goal is a second epoch of at
least 0.9x disk (each second-epoch figure is the best of three passes). Prints a markdown table
(copied into bench/README.md).

    .venv/bin/python bench/data_pipeline.py [--images 400] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402

from det_mmdet.config import build_config, experiment_from_dict  # noqa: E402
from det_mmdet.data import build_dataset  # noqa: E402
from det_mmdet.shapes import make_split  # noqa: E402
from object_stores import S3_ENV, gcs_emulator, moto_server, upload_gcs, upload_s3  # noqa: E402

BUCKET = "bench-data"


def dataset_for(data_root: str, data: dict | None):
    exp = experiment_from_dict(
        {
            "hyperparameters": {
                "global_batch_size": 8,
                "config_file": "configs/shapes_faster_rcnn.py",
                "override_mmdet_config": {"data_root": data_root},
            },
            **({"data": data} if data else {}),
        }
    )
    cfg = build_config(exp)
    return build_dataset(cfg.train_dataloader.dataset, "train_dataloader.dataset")


def epoch_rate(dataset, workers: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=workers, collate_fn=pseudo_collate)
    start = time.perf_counter()
    n = sum(len(batch["inputs"]) for batch in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=512, help="side of the square JPEGs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.update(S3_ENV)

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    local = work / "shapes"
    make_split(local, "train", args.images, seed=0, size=args.size)
    rows = []
    with moto_server(work / "moto.log") as s3, gcs_emulator(work / "gcs.log") as gcs:
        os.environ["AWS_ENDPOINT_URL"] = s3
        os.environ["STORAGE_EMULATOR_HOST"] = gcs
        os.environ["XDG_CACHE_HOME"] = str(work / "xdg")
        upload_s3(s3, BUCKET, local, "shapes/")
        upload_gcs(gcs, BUCKET, local, "shapes/")
        for workers in (0, 2):
            sources = {
                "disk": (f"{local}/", None),
                "S3 (moto_server)": (f"s3://{BUCKET}/shapes/", {"cache_dir": str(work / f"s3-cache-{workers}")}),
                "GCS (emulator)": (f"gs://{BUCKET}/shapes/", {"cache_dir": str(work / f"gcs-cache-{workers}")}),
            }
            disk_second = None
            for name, (data_root, data) in sources.items():
                dataset = dataset_for(data_root, data)
                first = epoch_rate(dataset, workers)
                second = max(epoch_rate(dataset, workers) for _ in range(3))  # the best of three cached epochs
                disk_second = disk_second or second
                rows.append((name, workers, first, second, second / disk_second))
                print(f"{name:18s} workers={workers} epoch1 {first:7.1f}/s epoch2 {second:7.1f}/s", file=sys.stderr)

    print(f"\n{args.images} training images, {args.size}x{args.size} JPEG, resized to 128; batch 8; ", end="")
    print(f"{os.cpu_count()} CPU cores, {platform.python_version()}, torch {torch.__version__}\n")
    print("| source | num_workers | epoch 1 images/s | epoch 2 images/s (cached) | epoch 2 / disk epoch 2 |")
    print("| --- | --- | --- | --- | --- |")
    for name, workers, first, second, ratio in rows:
        print(f"| {name} | {workers} | {first:.1f} | {second:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()

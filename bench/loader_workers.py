"""Images/s through the training loader with 0, 1 and 2 workers: mmengine's Runner's loader vs det-mmdet's.

One dataset object (the training pipeline of mmdet's ``faster-rcnn_r50_fpn_1x_coco.py``, whose
cost hardly depends on its random draws, or ``--config rtmdet-tiny``; mmdet's own transforms;
640-px photo-like JPEGs) goes through the DataLoader that ``Runner.build_dataloader``
makes (DefaultSampler, AspectRatioBatchSampler, pseudo_collate, the Runner's worker seeding) and the
one ``det_mmdet.data.train_loader`` makes from the same loader config (Determined's DataLoader,
epoch-seeded sampler, ``env_cfg.mp_cfg`` in each worker); OpenCV at 0 threads in the main process
as the Runner's ``setup_env`` leaves it. One pass over the data set per measurement, workers
started anew each pass (``persistent_workers=False``); alternating, median of ``--repeat``.

    .venv/bin/python bench/loader_workers.py [--images 96] [--workers 0 1 2] [--repeat 3] [--config faster-rcnn]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "model_def"))

from det_mmdet import data, environment  # noqa: E402
from det_mmdet.shapes import CLASSES, make_split  # noqa: E402

BATCH = 8


CONFIGS = {
    "faster-rcnn": "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
    "rtmdet-tiny": "rtmdet/rtmdet_tiny_8xb32-300e_coco.py",
}


def mmdet_dataset(root: Path, config_name: str):
    import mmdet
    from mmdet.registry import DATASETS
    from mmengine.config import Config

    config = Path(mmdet.__file__).parent / ".mim/configs" / CONFIGS[config_name]
    pipeline = Config.fromfile(str(config)).train_dataloader.dataset.pipeline
    cfg = dict(type="CocoDataset", data_root=f"{root}/", ann_file="annotations/train.json")
    cfg |= dict(data_prefix=dict(img="train/"), metainfo=dict(classes=CLASSES), pipeline=pipeline)
    return DATASETS.build(cfg)


def loader_cfg(dataset, workers: int) -> dict:
    return dict(
        dataset=dataset,
        batch_size=BATCH,
        num_workers=workers,
        persistent_workers=False,
        sampler=dict(type="DefaultSampler", shuffle=True),
        batch_sampler=dict(type="AspectRatioBatchSampler"),
    )


def runner_loader(dataset, workers: int):
    from mmengine.runner import Runner

    return Runner.build_dataloader(loader_cfg(dataset, workers), seed=0)


def our_loader(dataset, workers: int):
    cfg = {k: v for k, v in loader_cfg(dataset, workers).items() if k != "dataset"}
    loader = data.train_loader(dataset, cfg, BATCH, seed=0, env=environment.LoaderEnv("fork", 0))
    return loader.get_data_loader(repeat=False, skip=0, num_replicas=1, rank=0)


def rate(loader) -> float:
    random.seed(0)  # the same draws in the main process for both loaders (0 workers)
    np.random.seed(0)
    start = time.perf_counter()
    n = sum(len(batch["inputs"]) for batch in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--config", choices=sorted(CONFIGS), default="faster-rcnn", help="whose train pipeline")
    args = p.parse_args()
    import cv2
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    cv2.setNumThreads(0)  # the Runner's setup_env with mmdet's mp_cfg
    ways = {"mmengine Runner.build_dataloader": runner_loader, "det-mmdet data.train_loader": our_loader}
    rates = {(way, w): [] for w in args.workers for way in ways}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_split(root, "train", args.images, seed=0, size=640)
        dataset = mmdet_dataset(root, args.config)
        for _ in range(args.repeat):
            for w in args.workers:
                for way, make in ways.items():
                    rates[(way, w)].append(rate(make(dataset, w)))
    print(f"{args.images} images 640 px, {CONFIGS[args.config]}'s train pipeline (mmdet's transforms), batch {BATCH}, "
          f"{os.cpu_count()} cores; median of {args.repeat}, alternating")  # fmt: skip
    print("| loader | workers | images/s |\n|---|---|---|")
    for (way, w), values in rates.items():
        print(f"| {way} | {w} | {statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()

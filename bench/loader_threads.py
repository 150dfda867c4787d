"""RTMDet's training pipeline on 2 loader workers: OpenCV's own thread count vs ``env_cfg.mp_cfg``.

mmdet's configs set ``env_cfg.mp_cfg.opencv_num_threads=0`` so that each loader worker does its
OpenCV work on its own thread instead of starting one per core; det-mmdet applies it in the trial
and in every worker (``det_mmdet/environment.py``). Same data set, same pipeline (mmdet's
``rtmdet_tiny_8xb32-300e_coco.py`` train_pipeline, 640-px photo-like JPEGs), same loader built by
``det_mmdet.data``: without the setting and with it, alternating, median of ``--repeat``.

    .venv/bin/python bench/loader_threads.py [--images 96] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "model_def"))

from det_mmdet import data, environment  # noqa: E402
from det_mmdet.config import build_config, experiment_from_dict  # noqa: E402
from det_mmdet.data import build_dataset  # noqa: E402
from det_mmdet.shapes import make_split  # noqa: E402


def rtmdet_dataset(data_root: Path):
    import mmdet
    from mmengine.config import Config

    mmdet_config = Path(mmdet.__file__).parent / ".mim" / "configs" / "rtmdet" / "rtmdet_tiny_8xb32-300e_coco.py"
    rtmdet = Config.fromfile(str(mmdet_config))
    hparams = {
        "global_batch_size": 8,
        "config_file": "configs/shapes_rtmdet.py",
        "override_mmdet_config": {"data_root": f"{data_root}/"},
    }
    cfg = build_config(experiment_from_dict({"hyperparameters": hparams}))
    cfg.train_dataloader.dataset.pipeline = rtmdet.train_pipeline  # mmdet's own, 640 px
    return build_dataset(cfg.train_dataloader.dataset, "train_dataloader.dataset")


def rate(dataset, workers: int, env: environment.LoaderEnv | None) -> float:
    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), 8, drop_last=False)
    loader = data._loader(dataset, {"num_workers": workers}, batches, seed=0, env=env)
    torch_loader = loader.get_data_loader(repeat=False, skip=0, num_replicas=1, rank=0)
    start = time.perf_counter()
    n = sum(len(batch["inputs"]) for batch in torch_loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    import cv2

    default_threads = cv2.getNumThreads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_split(root, "train", args.images, seed=0, size=640)
        dataset = rtmdet_dataset(root)
        ways = {"OpenCV default": None, "mp_cfg opencv_num_threads=0": environment.LoaderEnv("fork", 0)}
        rates: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(args.repeat):
            for way, env in ways.items():
                cv2.setNumThreads(default_threads)  # the trial process as before; workers fork from it
                rates[way].append(rate(dataset, args.workers, env))
    print(f"{args.images} images 640 px, {args.workers} workers, {os.cpu_count()} cores, OpenCV default threads "
          f"{default_threads}; median of {args.repeat}, alternating")  # fmt: skip
    print("| loader | images/s |\n|---|---|")
    for way, values in rates.items():
        print(f"| {way} | {statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()

"""``det-mmdet demo`` (``make demo``): the whole product on a laptop in a few minutes.

Makes the drawn-shapes COCO data set once, trains the tiny Faster R-CNN of
``configs/shapes_faster_rcnn.py`` in Determined's local mode (progress bar, validation with the
COCO AP/AR table), then draws predictions on validation images with the exported ``model.pth``
through mmdet's ``DetInferencer`` and plots the loss and mAP curves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from det_mmdet import checkpoint, logs
from det_mmdet.config import build_config, experiment_from_dict
from det_mmdet.shapes import make_shapes

logger = logging.getLogger("det_mmdet")


def run(output_dir: Path, data_dir: Path, max_batches: int | None = None) -> int:
    from det_mmdet.cli import train_local

    make_shapes(data_dir)
    exp = experiment_from_dict(
        {
            "name": "shapes-demo",
            "hyperparameters": {
                "global_batch_size": 8,
                "config_file": "configs/shapes_faster_rcnn.py",
                "override_mmdet_config": {"data_root": str(data_dir.resolve()) + "/"},
            },
            "searcher": {"name": "single", "metric": "bbox_mAP", "smaller_is_better": False},
        }
    )
    cfg = build_config(exp)
    length = max_batches or int(cfg.train_cfg.max_iters)
    train_local(exp, cfg, output_dir, max_batches=length, validation_period=max(1, length // 3), report_period=20)

    newest = checkpoint.newest_checkpoint(output_dir / "checkpoints")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["group"] == "validation"][-1]["metrics"]
    draw_curves(records, output_dir / "curves.png")
    images = sorted((data_dir / "val").glob("*.jpg"))[:9]
    draw_predictions(newest, images, output_dir / "predictions.png")
    print(f"\nbbox_mAP {final['bbox_mAP']:.3f}  bbox_mAP_50 {final['bbox_mAP_50']:.3f}  after {length} batches")
    print(f"model: {newest}/model.pth + config.py")
    print(f"pictures: {output_dir / 'predictions.png'}, {output_dir / 'curves.png'}")
    return 0


def draw_curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["batches"], r["metrics"]["loss"]) for r in records if r["group"] == "training"]
    val = [(r["batches"], r["metrics"].get("bbox_mAP")) for r in records if r["group"] == "validation"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(*zip(*train, strict=True), color="tab:blue")
    ax1.set(title="training loss", xlabel="batches", ylabel="loss")
    ax2.plot(*zip(*val, strict=True), marker="o", color="tab:green")
    ax2.set(title="validation bbox_mAP", xlabel="batches", ylabel="mAP", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_predictions(model_dir: Path, images: list[Path], path: Path, score_thr: float = 0.5) -> None:
    """A 3x3 grid of validation images with the predicted boxes, classes and scores drawn."""
    import cv2

    from det_mmdet.export import inferencer

    model = inferencer(model_dir, device="cpu")
    files = [str(p) for p in images]
    with logs.inferencer_chatter():
        out = model(files, return_vis=True, no_save_vis=True, pred_score_thr=score_thr, batch_size=len(images))
    tiles = [cv2.resize(v, (256, 256), interpolation=cv2.INTER_NEAREST) for v in out["visualization"]]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 3)
    rows = [np.concatenate(tiles[i : i + 3], axis=1) for i in range(0, len(tiles), 3)]
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))

"""Validation pictures: a few fixed validation images with ground truth and predictions, at every validation.

mmdet's ``DetLocalVisualizer`` draws them (boxes, masks, class names, scores) with the weights that
were just validated (EMA ones included); they go to TensorBoard under Determined's tensorboard path on a
cluster (the trial's TensorBoard in the web UI, ``det tensorboard start``) and, locally, to
``OUTPUT/tensorboard/`` and as PNG under ``OUTPUT/vis/<batches>/``. The images are a seeded choice, the
same at every validation, so the pictures show how the predictions change.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from determined import pytorch

logger = logging.getLogger("det_mmdet")


@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """Python's, numpy's and torch's global random states as they were before the block."""
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def image_backend_args(dataset_cfg: Any) -> dict[str, Any] | None:
    """The ``backend_args`` the validation pipeline loads images with (S3, GCS, local)."""
    for step in dataset_cfg.get("pipeline") or []:
        if "LoadImageFromFile" in str(step.get("type", "")):
            return step.get("backend_args")
    return dataset_cfg.get("backend_args")


class ValidationPictures(pytorch.PyTorchCallback):
    """Draws ``count`` validation images after each validation (chief only)."""

    def __init__(self, trial: Any, tensorboard_dir: Path, png_dir: Path | None, count: int, seed: int = 0) -> None:
        self.trial, self.tensorboard_dir, self.png_dir = trial, Path(tensorboard_dir), png_dir
        size = len(trial.val_set)
        self.indices = sorted(random.Random(seed).sample(range(size), min(count, size)))
        self.writer = None
        self.visualizer = None

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        if self.trial.rank != 0 or not self.indices:
            return
        from mmcv import imwrite

        step = self.trial.hooks.runner.iter
        with random_state_kept():  # mmdet's visualizer reseeds numpy; training's augmentations must not notice
            pictures = self.draw()
        for name, drawn in pictures:
            self._writer().add_image(f"validation/{name}", drawn, global_step=step, dataformats="HWC")
            if self.png_dir is not None:
                imwrite(drawn[..., ::-1], str(self.png_dir / str(step) / f"{Path(name).stem}.png"))
        self._writer().flush()

    @torch.no_grad()
    def draw(self) -> list[tuple[str, Any]]:
        """``(image file name, RGB picture)`` for each chosen image, predicted by the current weights."""
        from mmcv import imfrombytes
        from mmengine.dataset import pseudo_collate
        from mmengine.fileio import get

        from det_mmdet.checkpoint import unwrap

        model = unwrap(self.trial.model)
        visualizer = self._visualizer()
        backend_args = image_backend_args(self.trial.cfg.val_dataloader.dataset)
        drawn = []
        for index in self.indices:
            batch = pseudo_collate([self.trial.val_set[index]])
            (sample,) = model(**model.data_preprocessor(batch, False), mode="predict")
            # The original image, read as the pipeline reads it (a bucket key under file_client_args too).
            image = imfrombytes(get(sample.img_path, backend_args=backend_args), channel_order="rgb")
            name = Path(sample.img_path).name
            visualizer.add_datasample(name, image, data_sample=sample, draw_gt=True, pred_score_thr=0.3, show=False)
            drawn.append((name, visualizer.get_image()))
        return drawn

    def _visualizer(self):
        if self.visualizer is None:
            from mmdet.visualization import DetLocalVisualizer

            self.visualizer = DetLocalVisualizer(name="det_mmdet_validation_pictures")
            self.visualizer.dataset_meta = self.trial.val_set.metainfo
        return self.visualizer

    def _writer(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tensorboard_dir))
        return self.writer

    def on_trial_shutdown(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        if self.png_dir is None and self.trial.rank == 0:
            # On a cluster Determined uploads TensorBoard files after each validation inside its loop,
            # but not after the final one (_pytorch_trial.py, _train): without this the last
            # validation's pictures never reach the web UI when the length is not a multiple of the
            # validation period.
            from determined import tensorboard

            core_context = self.trial.context._core
            core_context.train.upload_tensorboard_files(lambda _: True, tensorboard.util.get_rank_aware_path)

"""mmdet datasets behind Determined's ``DataLoader``.

Determined shards batches across slots (rank r takes every r-th batch of one shared order) and
skips already-trained batches on resume, so the batch order must be a pure function of the seed
and the epoch: ``EpochShuffleSampler`` reshuffles with ``seed + epoch`` each time it is iterated,
and ``AspectRatioBatchSampler`` groups landscape and portrait images as mmdet does so that padding
to a common size wastes little.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from determined import pytorch
from mmengine.dataset import pseudo_collate

from det_mmdet import (
    backends,  # noqa: F401  (registers the s3, gcs and fake file backends)
    logs,
)
from det_mmdet.environment import LoaderEnv
from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")


def build_dataset(dataset_cfg: dict[str, Any], what: str):
    """Build an mmdet dataset from its config; bad annotation files are one-line errors.

    mmdet drops boxes it cannot use (empty, outside the image) and, with ``filter_cfg``, images
    without boxes; both are counted and logged here, so nothing disappears unsaid.
    """
    from mmdet.registry import DATASETS

    try:
        # Lazily, so that the audit sees the annotation file being parsed.
        dataset = DATASETS.build({**dict(dataset_cfg), "lazy_init": True})
        audit = AnnotationAudit(dataset, what) if hasattr(dataset, "parse_data_info") else None
        with logs.chatter():  # pycocotools' "loading annotations into memory..."
            dataset.full_init()
    except FileNotFoundError as e:
        raise UserError(f"{what}: {e.strerror or 'file not found'}: {e.filename or e}") from None
    except json.JSONDecodeError as e:
        ann = dataset_cfg.get("ann_file", "")
        raise UserError(f"{what}: {ann} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if len(dataset) == 0:
        raise UserError(f"{what}: the dataset {dataset_cfg.get('ann_file', '')!r} has no usable images")
    if audit is not None:
        audit.report(len(dataset), dataset_cfg.get("indices"))
    return dataset


class AnnotationAudit:
    """Counts what mmdet's COCO parsing drops, and checks the file against the config's classes.

    It wraps the dataset's ``parse_data_info`` (called once per image while ``dataset.coco`` is
    loaded) to see each image's raw annotations next to the instances mmdet keeps.
    """

    def __init__(self, dataset, what: str) -> None:
        self.dataset, self.what = dataset, what
        self.images = self.boxes = self.kept = 0
        self.checked = False
        self.parse = dataset.parse_data_info
        dataset.parse_data_info = self._parse

    def _parse(self, raw: dict[str, Any]):
        if not self.checked:
            self._check_file()
            self.checked = True
        info = self.parse(raw)
        self.images += 1
        self.boxes += len(raw.get("raw_ann_info") or [])
        self.kept += len(info.get("instances") or []) if isinstance(info, dict) else 0
        return info

    def _check_file(self) -> None:
        coco = getattr(self.dataset, "coco", None)
        if coco is None:
            return
        ann = self.dataset.ann_file
        names = {c["name"] for c in coco.cats.values()}
        absent = [c for c in self.dataset.metainfo.get("classes", ()) if c not in names]
        if absent:
            raise UserError(
                f"{self.what}: classes not in {ann}: {', '.join(absent)} (its categories: {', '.join(sorted(names))})"
            )
        orphans = [a for a in coco.anns.values() if a.get("image_id") not in coco.imgs]
        if orphans:
            raise UserError(
                f"{self.what}: {len(orphans)} annotations in {ann} refer to image ids that are not in its images "
                f"(e.g. annotation {orphans[0].get('id')} -> image_id {orphans[0].get('image_id')})"
            )

    def report(self, kept_images: int, indices: Any = None) -> None:
        if self.boxes > self.kept:
            logger.warning(
                "%s: mmdet skipped %d of %d boxes (empty, degenerate or outside their image)",
                self.what, self.boxes - self.kept, self.boxes,
            )  # fmt: skip
        if self.images > kept_images:
            why = "filter_cfg (no usable boxes, or smaller than min_size)"
            if indices is not None:
                why = f"indices={indices!r} or {why}"
            logger.warning("%s: %d of %d images left out by %s", self.what, self.images - kept_images, self.images, why)


class NamedErrors(torch.utils.data.Dataset):
    """What the loaders see: any failure to load a sample names the sample's image, in one line.

    With ``at_epoch`` the indices come as ``(epoch, index)`` (``EpochTaggedBatches``) and ``at_epoch``
    is told each sample's epoch before the sample is made (``hooks.LoaderHooks``: pipeline switches).
    """

    def __init__(self, dataset, what: str, at_epoch: Callable[[int], None] | None = None) -> None:
        self.dataset, self.what, self.at_epoch = dataset, what, at_epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple[int, int]):
        if isinstance(index, tuple):
            epoch, index = index
            self.at_epoch(epoch)
        try:
            return self.dataset[index]
        except UserError:
            raise
        except Exception as e:  # re-raised as the user's problem with this image, cause chained
            path = self.dataset.get_data_info(index).get("img_path", f"sample {index}")
            raise UserError(f"{self.what}: {path}: {describe_sample_error(e)}") from e


def describe_sample_error(error: Exception) -> str:
    # mmcv's LoadImageFromFile asserts the decoded image is not None; older pipelines then fail on .shape.
    undecodable = "failed to load image" in str(error) or "'NoneType' object has no attribute 'shape'" in str(error)
    if isinstance(error, (AssertionError, AttributeError)) and undecodable:
        return "cannot decode the image (corrupt, truncated or not an image)"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Indices in a fresh order every pass, reproducible from ``seed`` and the pass number."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.size))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return self.size


class EpochTaggedBatches(torch.utils.data.Sampler):
    """``batches`` with each index as ``(epoch, index)``: a pass over them is one epoch.

    Determined repeats the training batches without end and its workers work ahead, so the epoch a
    sample belongs to has to travel with the sample to wherever the sample is made.
    """

    def __init__(self, batches: torch.utils.data.Sampler) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, self.passes = self.passes, self.passes + 1
        for batch in self.batches:
            yield [(epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class AspectRatioBatchSampler(torch.utils.data.BatchSampler):
    """Batches of images on the same side of square; leftovers are batched together at the end.

    Yields exactly ``ceil(len(sampler) / batch_size)`` batches, as Determined's epoch length needs.
    """

    def __init__(self, sampler: torch.utils.data.Sampler, batch_size: int, flags: Sequence[int]) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.flags = flags

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {0: [], 1: []}
        for idx in self.sampler:
            bucket = buckets[int(self.flags[idx])]
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        rest = buckets[0] + buckets[1]
        for i in range(0, len(rest), self.batch_size):
            yield rest[i : i + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


def aspect_flags(dataset) -> list[int]:
    """1 for landscape (w >= h), 0 for portrait, from the annotation file (no image reads)."""
    flags = []
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        flags.append(int(info.get("width", 1) >= info.get("height", 1)))
    return flags


def seed_worker(worker_id: int, env: LoaderEnv | None = None) -> None:
    """numpy and random in each loader worker follow torch's per-worker seed; env_cfg.mp_cfg's threads."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    if env is not None:
        env.in_worker()


# mmengine's samplers that this module's EpochShuffleSampler stands for (shuffled or in order).
SAMPLERS = ("DefaultSampler", "InfiniteSampler")


def train_loader(
    dataset,
    loader_cfg: dict[str, Any],
    batch_size: int,
    seed: int,
    at_epoch: Callable[[int], None] | None = None,
    env: LoaderEnv | None = None,
) -> pytorch.DataLoader:
    """Training batches: epoch-seeded order, aspect-ratio groups when the config asks for them."""
    sampler_cfg = loader_cfg.get("sampler") or {}
    kind = str(sampler_cfg.get("type", "DefaultSampler")).split(".")[-1]
    if kind not in SAMPLERS:
        raise UserError(f"train_dataloader.sampler.type {kind!r} is not supported (choose {' or '.join(SAMPLERS)})")
    sampler = EpochShuffleSampler(len(dataset), seed, shuffle=bool(sampler_cfg.get("shuffle", True)))
    batch_sampler_cfg = loader_cfg.get("batch_sampler") or {}
    if batch_sampler_cfg.get("type") == "AspectRatioBatchSampler":
        batches = AspectRatioBatchSampler(sampler, batch_size, aspect_flags(dataset))
    else:
        batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    if at_epoch is not None:
        batches = EpochTaggedBatches(batches)
    named = NamedErrors(dataset, "train_dataloader", at_epoch)
    return _loader(named, loader_cfg, batch_sampler=batches, seed=seed, env=env)


def val_loader(
    dataset, loader_cfg: dict[str, Any], batch_size: int, env: LoaderEnv | None = None
) -> pytorch.DataLoader:
    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), batch_size, drop_last=False)
    return _loader(NamedErrors(dataset, "val_dataloader"), loader_cfg, batch_sampler=batches, seed=0, env=env)


def _loader(dataset, loader_cfg: dict[str, Any], batch_sampler, seed: int, env: LoaderEnv | None) -> pytorch.DataLoader:
    workers = int(loader_cfg.get("num_workers", 0))
    method = env.start_method if env is not None and workers > 0 else None
    return pytorch.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=pseudo_collate,
        worker_init_fn=functools.partial(seed_worker, env=env),
        multiprocessing_context=method,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=bool(loader_cfg.get("persistent_workers", False)) and workers > 0,
        pin_memory=bool(loader_cfg.get("pin_memory", False)) and torch.cuda.is_available(),
    )

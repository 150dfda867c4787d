"""mmdet datasets behind Determined's ``DataLoader``.

Determined shards batches across slots (rank r takes every r-th batch of one shared order) and
skips already-trained batches on resume, so the batch order must be a pure function of the seed
and the epoch: ``EpochShuffleSampler`` reshuffles with ``seed + epoch`` each time it is iterated,
and ``AspectRatioBatchSampler`` groups landscape and portrait images as mmdet does so that padding
to a common size wastes little.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from determined import pytorch
from mmengine.dataset import pseudo_collate

from det_mmdet import backends  # noqa: F401  (registers the s3, gcs and fake file backends)
from det_mmdet.errors import UserError


def build_dataset(dataset_cfg: dict[str, Any], what: str):
    """Build an mmdet dataset from its config, with a one-line error for missing files."""
    from mmdet.registry import DATASETS

    try:
        dataset = DATASETS.build(dataset_cfg)
        dataset.full_init()
    except FileNotFoundError as e:
        raise UserError(f"{what}: {e.strerror or 'file not found'}: {e.filename or e}") from None
    if len(dataset) == 0:
        raise UserError(f"{what}: the dataset {dataset_cfg.get('ann_file', '')!r} has no usable images")
    return dataset


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


def seed_worker(worker_id: int) -> None:
    """numpy and random in each loader worker follow torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def train_loader(dataset, loader_cfg: dict[str, Any], batch_size: int, seed: int) -> pytorch.DataLoader:
    sampler = EpochShuffleSampler(len(dataset), seed, shuffle=True)
    batch_sampler_cfg = loader_cfg.get("batch_sampler") or {}
    if batch_sampler_cfg.get("type") == "AspectRatioBatchSampler":
        batches = AspectRatioBatchSampler(sampler, batch_size, aspect_flags(dataset))
    else:
        batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    return _loader(dataset, loader_cfg, batch_sampler=batches, seed=seed)


def val_loader(dataset, loader_cfg: dict[str, Any], batch_size: int) -> pytorch.DataLoader:
    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), batch_size, drop_last=False)
    return _loader(dataset, loader_cfg, batch_sampler=batches, seed=0)


def _loader(dataset, loader_cfg: dict[str, Any], batch_sampler, seed: int) -> pytorch.DataLoader:
    workers = int(loader_cfg.get("num_workers", 0))
    return pytorch.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=pseudo_collate,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=bool(loader_cfg.get("persistent_workers", False)) and workers > 0,
        pin_memory=bool(loader_cfg.get("pin_memory", False)) and torch.cuda.is_available(),
    )

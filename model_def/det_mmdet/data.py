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
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from determined import pytorch
from mmengine.dataset import pseudo_collate

from det_mmdet import (
    annotation_cache,
    backends,  # noqa: F401  (registers the s3, gcs and fake file backends)
    logs,
)
from det_mmdet.environment import LoaderEnv
from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")


def build_dataset(dataset_cfg: dict[str, Any], what: str, data: Mapping[str, Any] | None = None):
    """Build an mmdet dataset from its config; bad annotation files are one-line errors.

    mmdet drops boxes it cannot use (empty, outside the image) and, with ``filter_cfg``, images
    without boxes; both are counted and logged here, so nothing disappears unsaid. The parse comes
    from the node's annotation cache where the experiment's ``data`` section allows it.
    """
    from mmdet.registry import DATASETS

    try:
        # A wrapper's inner datasets first (so that they come from the cache), then lazily, so that
        # the audit sees the annotation file being parsed.
        dataset_cfg = annotation_cache.inner_built(dataset_cfg, what, lambda c, w: build_dataset(c, w, data))
        dataset = DATASETS.build({**dict(dataset_cfg), "lazy_init": True})
        audit = AnnotationAudit(dataset, what) if hasattr(dataset, "parse_data_info") else None
        with logs.chatter():  # pycocotools' "loading annotations into memory..."
            annotation_cache.full_init(dataset, what, audit, annotation_cache.cache_root(data))
    except FileNotFoundError as e:
        raise UserError(f"{what}: {e.strerror or 'file not found'}: {e.filename or e}") from None
    except json.JSONDecodeError as e:
        ann = dataset_cfg.get("ann_file", "")
        raise UserError(f"{what}: {ann} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if len(dataset) == 0:
        raise UserError(f"{what}: the dataset {dataset_cfg.get('ann_file', '')!r} has no usable images")
    if audit is not None:
        audit.report(len(dataset), dataset_cfg.get("indices"))
    from det_mmdet import fast_transforms  # here: it imports mmdet's datasets (0.7 s)

    fast_transforms.swap(dataset, (data or {}).get("fast_transforms", True))  # mmdet's outputs, faster
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
    """1 for landscape (w >= h), 0 for portrait, from the annotation file (no image reads); computed
    once per node where the dataset comes from the annotation cache."""

    def compute() -> list[int]:
        flags = []
        for i in range(len(dataset)):
            info = dataset.get_data_info(i)
            flags.append(int(info.get("width", 1) >= info.get("height", 1)))
        return flags

    return annotation_cache.remembered(dataset, "aspect_flags", compute).tolist()


def seed_worker(
    worker_id: int, env: LoaderEnv | None = None, quiet: bool = False, then: Callable[[int], None] | None = None
) -> None:
    """numpy and random in each loader worker follow torch's per-worker seed; env_cfg.mp_cfg's threads;
    ``disable_subprocess_warning`` (``quiet``) and the config's own ``worker_init_fn`` (``then``) as the Runner's.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    if env is not None:
        env.in_worker()
    if quiet and worker_id != 0:
        warnings.simplefilter("ignore")
    if then is not None:
        then(worker_id)


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
    return _loader(named, loader_cfg, batch_sampler=batches, seed=seed, env=env, where="train_dataloader")


def val_loader(
    dataset, loader_cfg: dict[str, Any], batch_size: int, env: LoaderEnv | None = None
) -> pytorch.DataLoader:
    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), batch_size, drop_last=False)
    named = NamedErrors(dataset, "val_dataloader")
    return _loader(named, loader_cfg, batch_sampler=batches, seed=0, env=env, where="val_dataloader")


# The loader keys mmengine's Runner passes on to torch's DataLoader (Runner.build_dataloader) that
# the trial honours, and those it refuses, with why. Others fail in the Runner too (a DataLoader
# TypeError); here they are one line.
LOADER_KEYS = (
    "dataset", "sampler", "batch_sampler", "batch_size", "num_workers", "persistent_workers", "pin_memory",
    "prefetch_factor", "timeout", "collate_fn", "worker_init_fn", "disable_subprocess_warning",
    "multiprocessing_context", "drop_last",
)  # fmt: skip
REFUSED_LOADER_KEYS = {
    "num_batch_per_epoch": "Determined's searcher sets the training length (searcher.max_length, --batches)",
    "pin_memory_device": "Determined's DataLoader has no such argument; pin_memory pins for the trial's GPU",
    "in_order": "batches come in order: Determined shards and resumes them by position",
    "generator": "the loader's generator is seeded from the trial's seed",
    "shuffle": "use sampler.shuffle",
}


def check_loader_keys(loader_cfg: Mapping[str, Any], where: str) -> None:
    for key in loader_cfg:
        if key in REFUSED_LOADER_KEYS:
            raise UserError(f"{where}.{key} is not supported: {REFUSED_LOADER_KEYS[key]}")
        if key not in LOADER_KEYS:
            raise UserError(f"{where}.{key}: unknown DataLoader key; allowed: {', '.join(LOADER_KEYS)}")
    if loader_cfg.get("drop_last"):
        raise UserError(f"{where}.drop_last=True is not supported: every image counts in Determined's epochs")


def registered_function(spec: Any, where: str, default: Callable | None = None) -> Callable | None:
    """``collate_fn`` / ``worker_init_fn`` as the Runner reads them: ``dict(type=name or callable, **kwargs)``."""
    from mmengine.registry import FUNCTIONS

    if spec is None or callable(spec):
        return spec if spec is not None else default
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise UserError(f"{where} must be dict(type=<registered function>, ...) or a function, got {spec!r}")
    kwargs = dict(spec)
    kind = kwargs.pop("type")
    fn = kind if callable(kind) else FUNCTIONS.get(kind)
    if fn is None:
        raise UserError(f"{where}.type {kind!r} is not a registered function (e.g. pseudo_collate, default_collate)")
    return functools.partial(fn, **kwargs) if kwargs else fn


def _rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def _loader(
    dataset,
    loader_cfg: Mapping[str, Any],
    batch_sampler,
    seed: int,
    env: LoaderEnv | None,
    where: str = "train_dataloader",
) -> pytorch.DataLoader:
    """Determined's DataLoader with the config's loader keys, as mmengine's Runner passes them on.

    Beyond the Runner: each rank's workers draw their own seeds (the Runner's ``seed + rank *
    workers + id``), fresh each epoch also without ``persistent_workers`` (the Runner's repeat the
    first epoch's augmentations); ``env_cfg.mp_cfg`` holds in every worker whatever the start method.
    """
    from det_mmdet.environment import START_METHODS

    check_loader_keys(loader_cfg, where)
    workers = int(loader_cfg.get("num_workers", 0))
    method = loader_cfg.get("multiprocessing_context") or (env.start_method if env is not None else None)
    if method is not None and method not in START_METHODS:
        raise UserError(f"{where}.multiprocessing_context {method!r}: choose {', '.join(START_METHODS)}")
    init = functools.partial(
        seed_worker,
        env=env,
        quiet=bool(loader_cfg.get("disable_subprocess_warning", False)),
        then=registered_function(loader_cfg.get("worker_init_fn"), f"{where}.worker_init_fn"),
    )
    prefetch = loader_cfg.get("prefetch_factor")
    return pytorch.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=registered_function(loader_cfg.get("collate_fn"), f"{where}.collate_fn", pseudo_collate),
        worker_init_fn=init,
        multiprocessing_context=method if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed + (_rank() << 32)),
        persistent_workers=bool(loader_cfg.get("persistent_workers", False)) and workers > 0,
        pin_memory=bool(loader_cfg.get("pin_memory", False)) and torch.cuda.is_available(),
        prefetch_factor=int(prefetch) if prefetch is not None and workers > 0 else None,
        timeout=float(loader_cfg.get("timeout", 0)) if workers > 0 else 0,
    )

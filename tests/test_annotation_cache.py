"""The annotation cache: mmdet's parse stored once per node and memory-mapped, item for item mmdet's."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS
from mmengine.registry import init_default_scope

from conftest import ROOT
from det_mmdet import annotation_cache, data
from det_mmdet.errors import UserError

CLASSES = ("cat", "dog", "bird")
PIPELINE = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]


def write_coco(root: Path, images: int = 24, seed: int = 0, name: str = "train.json") -> Path:
    """Tiny images and a COCO file with what mmdet drops or flags: images without objects, boxes of
    zero size or outside their image, crowd regions (RLE), a category the config does not list."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    imgs, anns = [], []
    for i in range(images):
        w, h = (32, 24) if i % 3 else (24, 32)
        w = 20 if i == 5 else w  # min_size below drops it
        path = root / "img" / f"{i:04d}.jpg"
        if not path.exists():
            cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        imgs.append({"id": 100 + i, "file_name": path.name, "width": w, "height": h})
        for _ in range(0 if i % 7 == 0 else int(rng.integers(1, 4))):
            x, y = float(rng.uniform(0, w - 6)), float(rng.uniform(0, h - 6))
            bw, bh = float(rng.uniform(2, 6)), float(rng.uniform(2, 6))
            kind = int(rng.integers(0, 10))
            if kind == 0:
                bw = 0.0  # degenerate
            elif kind == 1:
                x = w + 5.0  # outside the image
            seg = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
            ann = {"id": len(anns) + 1, "image_id": 100 + i, "category_id": int(rng.integers(1, 5))}
            ann |= {"bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0, "segmentation": seg}
            if kind == 2:
                ann |= {"iscrowd": 1, "segmentation": {"counts": [3, 5, w * h - 8], "size": [h, w]}}
            anns.append(ann)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate((*CLASSES, "fish"))]
    path = root / name
    path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    return path


def dataset_cfg(root: Path, ann: Path, **extra) -> dict:
    cfg = dict(type="CocoDataset", data_root=str(root) + "/", ann_file=ann.name, data_prefix=dict(img="img/"))
    cfg |= dict(metainfo=dict(classes=CLASSES), filter_cfg=dict(filter_empty_gt=True, min_size=21), pipeline=PIPELINE)
    return cfg | extra


def mmdets(cfg: dict):
    """The dataset as mmengine's Runner builds it."""
    dataset = DATASETS.build(cfg)
    dataset.full_init()
    return dataset


def ours(cfg: dict, cache: Path) -> tuple[object, str]:
    dataset = DATASETS.build({**cfg, "lazy_init": True})
    return dataset, annotation_cache.full_init(dataset, "train", None, cache)


def same(a, b) -> bool:
    """Deep equality of what datasets and pipelines return (tensors, arrays, masks, data samples)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "all_items"):  # mmengine's data elements
        return same(dict(a.metainfo_items()), dict(b.metainfo_items())) and same(dict(a.items()), dict(b.items()))
    if hasattr(a, "__dict__"):  # boxes, masks
        return same(vars(a), vars(b))
    return a == b


@pytest.fixture(autouse=True)
def scope():
    init_default_scope("mmdet")


def test_cached_dataset_is_mmdets_item_for_item(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    cfg = dataset_cfg(root, write_coco(root))
    reference = mmdets(cfg)
    parsed, first = ours(cfg, cache)
    cached, second = ours(cfg, cache)
    assert (first, second) == ("parsed", "cached")
    assert 0 < len(reference) < 24  # filter_cfg dropped images: empty ones, one below min_size
    for dataset in (parsed, cached):
        assert len(dataset) == len(reference)
        assert dataset.metainfo == reference.metainfo
        assert (dataset.cat_ids, dataset.cat2label) == (reference.cat_ids, reference.cat2label)
        assert np.array_equal(dataset.data_address, reference.data_address)
        assert bytes(dataset.data_bytes) == bytes(reference.data_bytes)
        for i in range(len(reference)):
            assert same(dataset.get_data_info(i), reference.get_data_info(i))
            seed = 1000 + i
            np.random.seed(seed)
            want = reference[i]
            np.random.seed(seed)
            assert same(dataset[i], want), i


def test_build_dataset_reports_what_mmdet_dropped_from_the_cache_too(tmp_path, caplog):
    root, cache = tmp_path / "data", tmp_path / "cache"
    cfg = dataset_cfg(root, write_coco(root))
    runs = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="det_mmdet"):
            dataset = data.build_dataset(cfg, "train", {"annotation_cache": str(cache)})
        runs.append([r.getMessage() for r in caplog.records if r.levelno == logging.WARNING])
        assert isinstance(dataset.data_bytes, annotation_cache.MappedArray)
    assert any("mmdet skipped" in line and "boxes" in line for line in runs[0])
    assert any("images left out by filter_cfg" in line for line in runs[0])
    assert runs[0] == runs[1]


def test_a_changed_file_or_setting_is_parsed_anew(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    ann = write_coco(root, images=24, seed=0)
    cfg = dataset_cfg(root, ann)
    assert ours(cfg, cache)[1] == "parsed"
    old = os.stat(ann)
    write_coco(root, images=24, seed=1)  # new boxes, same path
    os.utime(ann, ns=(old.st_atime_ns, old.st_mtime_ns))  # even with the old time stamp
    dataset, status = ours(cfg, cache)
    assert status == "parsed"
    assert bytes(dataset.data_bytes) == bytes(mmdets(cfg).data_bytes)
    assert ours(cfg, cache)[1] == "cached"
    other = dataset_cfg(root, ann, filter_cfg=dict(filter_empty_gt=False))
    dataset, status = ours(other, cache)
    assert status == "parsed" and len(dataset) == len(mmdets(other)) > len(mmdets(cfg))
    assert len([p for p in cache.iterdir() if p.is_dir() and len(p.name) == 32]) == 3


def test_a_settled_files_digest_is_remembered_and_a_rewrite_still_seen(tmp_path, monkeypatch):
    monkeypatch.setattr(annotation_cache, "SETTLED_S", 0.2)  # 2 s in use
    cache = tmp_path / "cache"
    cache.mkdir()
    ann = write_coco(tmp_path / "data")
    assert annotation_cache.file_digest(ann, cache) and not (cache / "digests").exists()  # just written
    time.sleep(0.3)
    digest = annotation_cache.file_digest(ann, cache)
    assert len(list((cache / "digests").iterdir())) == 1
    assert annotation_cache.file_digest(ann, cache) == digest
    write_coco(tmp_path / "data", seed=1)
    assert annotation_cache.file_digest(ann, cache) != digest


@DATASETS.register_module()
class SlowCocoDataset(CocoDataset):
    """CocoDataset that takes a second to parse and notes each parse in ``parses``."""

    parses: str = ""

    def load_data_list(self):
        with open(self.parses, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return super().load_data_list()


def _build_in_child(cfg: dict, cache: Path, out) -> None:
    init_default_scope("mmdet")
    out.put(ours(cfg, cache)[1])


def test_two_processes_at_once_parse_once(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    SlowCocoDataset.parses = str(tmp_path / "parses.txt")
    cfg = dataset_cfg(root, write_coco(root), type="SlowCocoDataset")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    children = [ctx.Process(target=_build_in_child, args=(cfg, cache, out)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert sorted(out.get(timeout=5) for _ in children) == ["cached", "parsed"]
    assert len(Path(SlowCocoDataset.parses).read_text().splitlines()) == 1


def test_the_cache_is_mapped_read_only_and_pickles_as_its_path(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    cfg = dataset_cfg(root, write_coco(root))
    ours(cfg, cache)
    dataset, status = ours(cfg, cache)
    assert status == "cached"
    for array in (dataset.data_bytes, dataset.data_address):
        assert isinstance(array, np.memmap) and not array.flags.writeable
        assert Path(array.filename).parent.parent == cache
    with pytest.raises(ValueError):
        dataset.data_bytes[0] = 1
    dumped = pickle.dumps(dataset)  # what a loader worker started by spawn receives
    assert len(dumped) < dataset.data_bytes.nbytes / 2 or dataset.data_bytes.nbytes < 4096
    assert dataset.data_bytes.nbytes > 4096
    again = pickle.loads(dumped)
    assert isinstance(again.data_bytes, np.memmap)
    assert same(again.get_data_info(3), dataset.get_data_info(3))


def test_aspect_ratio_groups_are_computed_once_per_node(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    cfg = dataset_cfg(root, write_coco(root))
    reference = mmdets(cfg)
    want = [
        int(reference.get_data_info(i)["width"] >= reference.get_data_info(i)["height"]) for i in range(len(reference))
    ]
    assert 0 < sum(want) < len(want)
    first = data.aspect_flags(ours(cfg, cache)[0])
    later, status = ours(cfg, cache)
    assert status == "cached" and (Path(later.annotation_cache_entry) / "aspect_flags.npy").is_file()
    assert first == data.aspect_flags(later) == data.aspect_flags(reference) == want


def test_wrapped_datasets_come_from_the_cache(tmp_path):
    """YOLOX's MultiImageMixDataset builds its dataset itself; build_dataset builds it first."""
    root, cache = tmp_path / "data", tmp_path / "cache"
    inner = dataset_cfg(root, write_coco(root), pipeline=PIPELINE[:2])
    cfg = dict(type="MultiImageMixDataset", dataset=inner, pipeline=[dict(type="PackDetInputs")])
    for _ in range(2):
        wrapped = data.build_dataset(cfg, "train", {"annotation_cache": str(cache)})
        assert isinstance(wrapped.dataset.data_bytes, annotation_cache.MappedArray)
    reference = DATASETS.build(cfg)
    assert len(wrapped) == len(reference)
    assert same(wrapped[2], reference[2])


def test_where_the_cache_is_and_turning_it_off(tmp_path, monkeypatch):
    monkeypatch.delenv(annotation_cache.CACHE_ENV, raising=False)
    assert annotation_cache.cache_root(None) == annotation_cache.DEFAULT_ROOT
    assert annotation_cache.cache_root({"cache_dir": "/c"}) == Path("/c/datasets")
    assert annotation_cache.cache_root({"annotation_cache": "/a", "cache_dir": "/c"}) == Path("/a")
    assert annotation_cache.cache_root({"annotation_cache": False}) is None
    monkeypatch.setenv(annotation_cache.CACHE_ENV, "off")
    assert annotation_cache.cache_root(None) is None
    monkeypatch.setenv(annotation_cache.CACHE_ENV, str(tmp_path / "env"))
    assert annotation_cache.cache_root({}) == tmp_path / "env"
    with pytest.raises(UserError, match="data.annotation_cache: a directory, or false"):
        annotation_cache.cache_root({"annotation_cache": True})
    root = tmp_path / "data"
    cfg = dataset_cfg(root, write_coco(root))
    dataset = data.build_dataset(cfg, "train", {"annotation_cache": False})
    assert not isinstance(dataset.data_bytes, np.memmap)
    assert not (tmp_path / "env").exists()


def test_startup_bench_runs_all_three_builds(tmp_path):
    """A miniature bench/startup.py: mmdet's build, the first rank, and later ranks at once."""
    cmd = [sys.executable, "bench/startup.py", "--images", "300", "--ranks", "2", "--repeat", "1"]
    proc = subprocess.run(cmd + ["--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "| build |" not in line]
    names = [row[1].strip() for row in rows]
    assert names == ["mmdet 3.3.0 (Runner's build)", "det-mmdet, first rank (parses, caches)", "det-mmdet, later ranks"]
    assert all(float(row[3]) > 0 for row in rows)  # seconds
    assert "same data_list as mmdet's: yes" in proc.stdout

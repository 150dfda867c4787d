"""Parsed annotations cached per node: a dataset's ``data_list`` parsed once, then memory-mapped.

mmengine's ``BaseDataset.full_init`` parses the annotation file (``load_data_list``), filters it
(``filter_cfg``), takes ``indices`` and serializes what is left into one byte buffer
(``data_bytes``, pickles end to end) and its offsets (``data_address``). At COCO-train size that is
half a minute and some GB of memory, in every rank of a node and again in every trial. Here the two
arrays are written once into a cache directory under a content key, built by one process under a
file lock, and every later process maps the files read-only: ranks and loader workers share the
node's page cache instead of holding copies, and the dataset's items are mmdet's own, byte for byte.

The key covers what the parse depends on: the annotation file's bytes (sha256, remembered per
path, size, mtime and inode so that later processes need not read the file), the dataset's class and
the source files it is defined in, every setting of the dataset (``metainfo``/classes, ``data_root``,
``data_prefix``, ``filter_cfg``, ``indices``, ``test_mode``, ...; ``backend_args`` without
credentials) and the mmdet, mmengine and numpy versions. A changed file or setting is parsed anew;
old entries stay until deleted (deleting the directory is always safe).

Where: ``data.annotation_cache`` (a directory, or ``false`` for off), else
``$DET_MMDET_ANNOTATION_CACHE`` (likewise, ``off`` for off), else ``<data.cache_dir>/datasets``,
else ``/tmp/det-mmdet-cache/datasets``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import pickle
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")

CACHE_ENV = "DET_MMDET_ANNOTATION_CACHE"
DEFAULT_ROOT = Path("/tmp/det-mmdet-cache/datasets")
OFF = ("off", "false", "no", "0", "none")
SETTLED_S = 2.0  # see file_digest
FORMAT = 1  # bump when what an entry holds changes

# Attributes of a dataset that are not parse settings: the parse's outputs, the pipeline (applied
# per item, after the cache), the retry count, and the file itself (keyed by its bytes instead).
NOT_SETTINGS = frozenset(
    {"data_list", "data_bytes", "data_address", "_fully_initialized", "pipeline", "max_refetch", "ann_file"}
    | {"annotation_cache_entry"}
)
# What CocoDataset's load_data_list leaves on the dataset besides data_list (cat_img_map is read by
# filter_data only, which the cache has already applied).
EXTRAS = ("cat_ids", "cat2label")


# ---- where ----------------------------------------------------------------------------------------


def check_setting(value: Any, where: str = "data.annotation_cache") -> None:
    if not (value is None or isinstance(value, (bool, str))) or value is True or value == "":
        raise UserError(f"{where}: a directory, or false to turn the annotation cache off; got {value!r}")


def cache_root(data: Mapping[str, Any] | None = None) -> Path | None:
    """The cache directory the experiment's ``data`` section and the environment ask for; None: off."""
    data = data or {}
    setting = data.get("annotation_cache")
    check_setting(setting)
    if setting is None:
        setting = os.environ.get(CACHE_ENV) or None
        check_setting(setting, CACHE_ENV)
    if setting is False or (isinstance(setting, str) and setting.strip().lower() in OFF):
        return None
    if setting:
        return Path(setting)
    if data.get("cache_dir"):
        return Path(str(data["cache_dir"])) / "datasets"
    return DEFAULT_ROOT


def _own_directory(root: Path) -> Path:
    """``root``, made if needed; one owned by another user is refused (entries are unpickled)."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise UserError(f"annotation cache {root}: cannot create it ({e.strerror}); set {CACHE_ENV}") from None
    if root.stat().st_uid != os.getuid():
        raise UserError(f"annotation cache {root} belongs to another user; set {CACHE_ENV} or data.annotation_cache")
    return root


# ---- the mapped arrays ----------------------------------------------------------------------------


class MappedArray(np.memmap):
    """A read-only mapped file that pickles as its path: a worker started by spawn maps it again."""

    def __reduce__(self) -> tuple:
        if isinstance(self.base, mmap.mmap) and self.filename:
            return _map, (self.filename, self.dtype.str, self.shape)
        return np.asarray(self).copy().__reduce__()  # a slice: its own bytes


def _map(path: str, dtype: str, shape: tuple[int, ...]) -> MappedArray:
    return MappedArray(path, dtype=np.dtype(dtype), mode="r", shape=shape)


# ---- keys -----------------------------------------------------------------------------------------


def file_digest(path: Path, root: Path) -> str:
    """sha256 of the file's bytes, remembered under its path, size, mtime and inode.

    File times tick coarsely (a few ms), so two writes of one size can share an mtime: a digest is
    remembered only for a file unchanged for ``SETTLED_S``, after which any write moves its mtime.
    """
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{st.st_dev}"
    memo = root / "digests" / hashlib.sha256(stamp.encode()).hexdigest()
    with contextlib.suppress(FileNotFoundError):
        return memo.read_text()
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if time.time() - max(st.st_mtime, st.st_ctime) > SETTLED_S:
        memo.parent.mkdir(exist_ok=True)
        _write_atomically(memo, digest.encode())
    return digest


def _source_digest(cls: type) -> str:
    """The source files that define ``cls`` and its bases: an edited custom dataset is parsed anew."""
    h = hashlib.sha256()
    for base in cls.__mro__:
        module = sys.modules.get(base.__module__)
        path = getattr(module, "__file__", None)
        if path and base.__module__ != "builtins":
            h.update(Path(path).read_bytes())
    return h.hexdigest()


def settings(dataset) -> dict[str, Any] | None:
    """The dataset's parse settings as JSON-able text; None when one has no stable text."""
    from det_mmdet.backends import CREDENTIAL_KEYS

    state = {}
    for name, value in vars(dataset).items():
        if name in NOT_SETTINGS or callable(value):
            continue
        if name == "backend_args" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k.lower() not in CREDENTIAL_KEYS}
        state[name] = value
    import mmdet
    import mmengine

    cls = type(dataset)
    state["__class__"] = f"{cls.__module__}.{cls.__qualname__}"
    state["__source__"] = _source_digest(cls)
    state["__versions__"] = [FORMAT, mmdet.__version__, mmengine.__version__, np.__version__, pickle.DEFAULT_PROTOCOL]
    text = json.dumps(state, sort_keys=True, default=repr)
    return None if " at 0x" in text else json.loads(text)


def cacheable(dataset) -> str | None:
    """Why ``dataset`` cannot be cached (None: it can)."""
    from mmdet.datasets import BaseDetDataset
    from mmengine.dataset import BaseDataset

    if not isinstance(dataset, BaseDataset) or not hasattr(dataset, "load_data_list"):
        return "not a dataset that parses an annotation file"
    if type(dataset).full_init not in (BaseDataset.full_init, BaseDetDataset.full_init):
        return f"{type(dataset).__name__} has its own full_init"
    if not dataset.serialize_data:
        return "serialize_data=False"
    if getattr(dataset, "proposal_file", None):
        return "a proposal_file"
    if not dataset.ann_file:
        return "no ann_file"
    return None


@contextlib.contextmanager
def _local(dataset) -> Iterator[Path]:
    from mmengine.fileio import get_local_path

    with get_local_path(dataset.ann_file, backend_args=getattr(dataset, "backend_args", None)) as local:
        yield Path(local)


def entry_key(dataset, root: Path) -> str | None:
    state = settings(dataset)
    if state is None:
        return None
    with _local(dataset) as local:
        state["__ann_file__"] = file_digest(local, root)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32]


# ---- the cache ------------------------------------------------------------------------------------


def full_init(dataset, what: str, audit: Any = None, root: Path | None = DEFAULT_ROOT) -> str:
    """``dataset.full_init()``, from the cache when it holds this file and these settings.

    ``audit`` (``data.AnnotationAudit`` or None) gets its counts from the entry on a hit. Returns
    how the dataset was made: ``"off"``, ``"not cached: <why>"``, ``"parsed"`` or ``"cached"``.
    """
    why = "off" if root is None else cacheable(dataset)
    if why is not None:
        dataset.full_init()
        return why if why == "off" else f"not cached: {why}"
    root = _own_directory(root)
    start = time.perf_counter()
    key = entry_key(dataset, root)
    if key is None:
        logger.warning("%s: a setting has no stable text, so the annotation cache is not used", what)
        dataset.full_init()
        return "not cached: unstable settings"
    entry = root / key
    if not (entry / "meta.pkl").is_file():
        with _locked(entry, what):
            if not (entry / "meta.pkl").is_file():
                dataset.full_init()
                _store(dataset, audit, entry)
                _attach(dataset, audit, entry)
                logger.info(
                    "%s: parsed %s in %.1f s; cached in %s", what, dataset.ann_file, time.perf_counter() - start, entry
                )
                return "parsed"
    _attach(dataset, audit, entry)
    logger.info(
        "%s: %s from the annotation cache %s (%.2f s)", what, dataset.ann_file, entry, time.perf_counter() - start
    )
    return "cached"


@contextlib.contextmanager
def _locked(entry: Path, what: str) -> Iterator[None]:
    """The entry's file lock; waiting for another process (a rank parsing the same file) is logged."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(entry) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("%s: waiting for another process to parse the annotations (%s)", what, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _store(dataset, audit: Any, entry: Path) -> None:
    """Write the parse into ``entry``: into a scratch directory first, renamed when whole."""
    scratch = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    np.ascontiguousarray(dataset.data_bytes, dtype=np.uint8).tofile(scratch / "data_bytes")
    np.ascontiguousarray(dataset.data_address, dtype=np.int64).tofile(scratch / "data_address")
    meta = {
        "format": FORMAT,
        "length": len(dataset.data_address),
        "size": int(dataset.data_bytes.size),
        "metainfo": dataset._metainfo,
        "extras": {name: getattr(dataset, name) for name in EXTRAS if hasattr(dataset, name)},
        "audit": None if audit is None else (audit.images, audit.boxes, audit.kept),
        "ann_file": str(dataset.ann_file),
    }
    (scratch / "meta.pkl").write_bytes(pickle.dumps(meta, protocol=4))
    os.rename(scratch, entry)


def _attach(dataset, audit: Any, entry: Path) -> None:
    """Point ``dataset`` at the entry's mapped arrays, as ``full_init`` would have left it."""
    meta = pickle.loads((entry / "meta.pkl").read_bytes())
    if meta["length"] == 0:  # nothing to map (an empty file cannot be); mmengine's empty arrays
        dataset.data_bytes, dataset.data_address = np.array([], np.uint8), np.array([], np.int64)
    else:
        dataset.data_bytes = _map(str(entry / "data_bytes"), "|u1", (meta["size"],))
        dataset.data_address = _map(str(entry / "data_address"), "<i8", (meta["length"],))
    dataset._metainfo = meta["metainfo"]
    for name, value in meta["extras"].items():
        setattr(dataset, name, value)
    dataset.data_list = []
    dataset._fully_initialized = True
    dataset.annotation_cache_entry = str(entry)
    if audit is not None and meta["audit"] is not None:
        audit.images, audit.boxes, audit.kept = meta["audit"]


def remembered(dataset, name: str, compute: Callable[[], Any]) -> np.ndarray:
    """``compute()`` as an array, kept in the dataset's cache entry (when it has one) for later processes.

    For what start-up derives from every item (the aspect-ratio groups read all 118k at COCO size).
    """
    entry = getattr(dataset, "annotation_cache_entry", None)
    path = Path(entry) / f"{name}.npy" if entry else None
    if path is not None and path.is_file():
        return np.load(path)
    value = np.asarray(compute())
    if path is not None:
        scratch = path.with_name(f"{path.name}.tmp-{os.getpid()}.npy")
        np.save(scratch, value)
        os.replace(scratch, path)  # another process's copy is the same array
    return value


def _write_atomically(path: Path, data: bytes) -> None:
    scratch = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    scratch.write_bytes(data)
    os.replace(scratch, path)


# ---- wrappers -------------------------------------------------------------------------------------


def inner_built(dataset_cfg: Mapping[str, Any], what: str, build: Callable[[Any, str], Any]) -> dict[str, Any]:
    """A wrapper's config (MultiImageMixDataset, RepeatDataset, ConcatDataset, ...) with its inner
    datasets built by ``build``, so that they too come from the cache (a wrapper builds them itself).
    """
    cfg = dict(dataset_cfg)
    if isinstance(cfg.get("dataset"), Mapping):
        cfg["dataset"] = build(cfg["dataset"], f"{what}.dataset")
    if isinstance(cfg.get("datasets"), (list, tuple)):
        cfg["datasets"] = [
            build(d, f"{what}.datasets[{i}]") if isinstance(d, Mapping) else d for i, d in enumerate(cfg["datasets"])
        ]
    return cfg

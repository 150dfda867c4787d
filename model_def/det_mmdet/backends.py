"""mmengine file backends for S3 (boto3), Google Cloud Storage and a fake image source.

Registering them with ``mmengine.fileio`` makes every reader in an mmdet config work unchanged:
``LoadImageFromFile`` calls ``get``, ``CocoDataset`` and ``CocoMetric`` call ``get_local_path``, and
datasets join paths with ``join_path``. Two ways in:

- URIs: a ``data_root`` of ``s3://bucket/coco/`` or ``gs://bucket/coco/`` picks the backend by prefix;
- the model-hub form ``backend_args={"backend": "s3", "bucket_name": "b"}``: paths are keys in ``b``.

Credentials come from the libraries' standard chains (environment, profiles, instance roles,
application-default credentials; ``AWS_ENDPOINT_URL`` and ``STORAGE_EMULATOR_HOST`` for other
servers), never from the config, so they cannot end up in a saved ``config.py``.

Annotation files are fetched once per node into a cache guarded by a file lock (ranks and loader
workers share it); images can be cached too (``cache_dir``), bounded by ``cache_max_gb``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import posixpath
import random
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mmengine.fileio import register_backend
from mmengine.fileio.backends import BaseStorageBackend, LocalBackend

from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")
T = TypeVar("T")

# What a transient failure is retried: attempts in all, and the first backoff (doubling, full jitter).
MAX_ATTEMPTS = 6
BACKOFF_S = 0.25
MAX_BACKOFF_S = 20.0

# Keys that would put a credential into the config; they belong to the environment instead.
CREDENTIAL_KEYS = frozenset(
    {"aws_access_key_id", "aws_secret_access_key", "aws_session_token", "credentials", "access_key", "secret_key"}
)

MISSING, DENIED, TRANSIENT = "missing", "denied", "transient"


def default_annotation_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "det-mmdet" / "annotations"


class ObjectStoreBackend(BaseStorageBackend):
    """What S3 and GCS share: locating objects, retries, caches; subclasses talk to the service."""

    scheme = ""
    service = ""

    def __init__(
        self,
        bucket_name: str | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        profile_name: str | None = None,
        project: str | None = None,
        cache_dir: str | None = None,
        cache_max_gb: float | None = None,
        annotation_cache_dir: str | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        self.bucket_name = bucket_name
        self.endpoint_url = endpoint_url
        self.region_name = region_name
        self.profile_name = profile_name
        self.project = project
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_s = float(backoff_s)
        self.image_cache = Path(cache_dir) / "objects" if cache_dir else None
        self.cache_max_bytes = int(float(cache_max_gb) * 1e9) if cache_max_gb is not None else None
        self._cache_bytes: int | None = None  # this process's running estimate, scanned once
        if annotation_cache_dir:
            self.annotation_cache = Path(annotation_cache_dir)
        elif cache_dir:
            self.annotation_cache = Path(cache_dir) / "annotations"
        else:
            self.annotation_cache = default_annotation_cache()
        # One client per process: dataloader workers fork, and boto3 clients are not fork-safe.
        self._client_obj: Any = None
        self._client_pid = -1
        self._lock = threading.Lock()

    # ---- what a service implements -------------------------------------------------------------

    def _make_client(self) -> Any:
        raise NotImplementedError

    def _read(self, bucket: str, key: str) -> bytes:
        raise NotImplementedError

    def _stat(self, bucket: str, key: str) -> tuple[int, str] | None:
        """(size, etag) of the object, or None when it does not exist."""
        raise NotImplementedError

    def _classify(self, error: Exception) -> str | None:
        """MISSING, DENIED, TRANSIENT, or None for an error we do not know (it propagates)."""
        raise NotImplementedError

    # ---- locating --------------------------------------------------------------------------------

    def _client(self) -> Any:
        with self._lock:
            if self._client_pid != os.getpid():
                self._client_obj = self._make_client()
                self._client_pid = os.getpid()
            return self._client_obj

    def locate(self, filepath: str | Path) -> tuple[str, str]:
        path = str(filepath)
        for prefix in (f"{self.scheme}://", *(f"{p}://" for p in self.aliases())):
            if path.startswith(prefix):
                bucket, _, key = path[len(prefix) :].partition("/")
                if not bucket or not key:
                    raise UserError(f"{path}: expected {self.scheme}://BUCKET/KEY")
                return bucket, key
        if not self.bucket_name:
            raise UserError(
                f"{path}: not a {self.scheme}:// URI and backend_args has no bucket_name for the {self.service} backend"
            )
        return self.bucket_name, path

    @classmethod
    def aliases(cls) -> tuple[str, ...]:
        return ()

    def uri(self, filepath: str | Path) -> str:
        bucket, key = self.locate(filepath)
        return f"{self.scheme}://{bucket}/{key}"

    # ---- retries ---------------------------------------------------------------------------------

    def _call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        """``fn()``, retrying transient failures with exponential backoff and full jitter."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return fn()
            except Exception as e:  # classified below; anything unknown is re-raised as it is
                kind = self._classify(e)
                if kind == MISSING:
                    raise UserError(f"{uri} does not exist") from None
                if kind == DENIED:
                    raise UserError(
                        f"permission denied {what} {uri} ({_describe(e)}): check the {self.service} credentials"
                    ) from None
                if kind != TRANSIENT:
                    raise
                if attempt == self.max_attempts:
                    raise UserError(f"{what} {uri} failed {attempt} times; last error: {_describe(e)}") from None
                delay = random.uniform(0, min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1)))
                logger.warning(
                    "%s %s: %s; retry %d/%d in %.2fs", what, uri, _describe(e), attempt, self.max_attempts - 1, delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    # ---- mmengine's backend interface --------------------------------------------------------------

    def get(self, filepath: str | Path) -> bytes:
        bucket, key = self.locate(filepath)
        uri = f"{self.scheme}://{bucket}/{key}"
        cached = self.image_cache / self.scheme / bucket / key if self.image_cache else None
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        data = self._call("reading", uri, lambda: self._read(bucket, key))
        if cached is not None:
            self._store(cached, data)
        return data

    def get_text(self, filepath: str | Path, encoding: str = "utf-8") -> str:
        return self.get(filepath).decode(encoding)

    def exists(self, filepath: str | Path) -> bool:
        bucket, key = self.locate(filepath)
        return self._call("checking", f"{self.scheme}://{bucket}/{key}", lambda: self._stat(bucket, key)) is not None

    isfile = exists

    def join_path(self, filepath: str | Path, *filepaths: str | Path) -> str:
        joined = str(filepath)
        for part in map(str, filepaths):
            joined = part if "://" in part else posixpath.join(joined, part)
        return joined

    @contextlib.contextmanager
    def get_local_path(self, filepath: str | Path) -> Iterator[str]:
        """A local copy, fetched once per node: annotation files are read by every rank and the evaluator."""
        yield str(self.fetch_to_cache(filepath))

    # ---- caches -------------------------------------------------------------------------------------

    def fetch_to_cache(self, filepath: str | Path) -> Path:
        from filelock import FileLock

        bucket, key = self.locate(filepath)
        uri = f"{self.scheme}://{bucket}/{key}"
        target = self.annotation_cache / self.scheme / bucket / key
        target.parent.mkdir(parents=True, exist_ok=True)
        stamp = target.with_name(target.name + ".source.json")
        with FileLock(str(target) + ".lock"):
            stat = self._call("checking", uri, lambda: self._stat(bucket, key))
            if stat is None:
                raise UserError(f"{uri} does not exist")
            size, etag = stat
            source = {"uri": uri, "size": size, "etag": etag}
            if target.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == source:
                logger.info("using the cached copy of %s: %s", uri, target)
                return target
            data = self._call("reading", uri, lambda: self._read(bucket, key))
            _write_atomically(target, data)
            stamp.write_text(json.dumps(source))
            logger.info("fetched %s (%.1f MB) into %s", uri, len(data) / 1e6, target)
        return target

    def _store(self, path: Path, data: bytes) -> None:
        if self.cache_max_bytes is not None:
            if self._cache_bytes is None:
                self._cache_bytes = _tree_size(self.image_cache)
            if self._cache_bytes + len(data) > self.cache_max_bytes:
                return  # full: later reads of this object go to the bucket, as the bound asks
            self._cache_bytes += len(data)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, data)


class S3Backend(ObjectStoreBackend):
    """Amazon S3 and S3-compatible stores (MinIO, Ceph): ``s3://bucket/key`` or keys in ``bucket_name``."""

    scheme = "s3"
    service = "S3"

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(profile_name=self.profile_name)
        # Retries are ours (one policy, one message for both services), so boto3 makes one attempt.
        config = Config(retries={"total_max_attempts": 1}, connect_timeout=10, read_timeout=60, max_pool_connections=32)
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region_name, config=config)

    def _read(self, bucket: str, key: str) -> bytes:
        return self._client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def _stat(self, bucket: str, key: str) -> tuple[int, str] | None:
        from botocore.exceptions import ClientError

        try:
            head = self._client().head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if _s3_code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"]), str(head.get("ETag", ""))

    def _classify(self, error: Exception) -> str | None:
        from botocore import exceptions as bx

        if isinstance(error, bx.ClientError):
            code = _s3_code(error)
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
                return MISSING
            if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return DENIED
            if status >= 500 or status == 429 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                return TRANSIENT
            return None
        if isinstance(error, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return DENIED
        if isinstance(error, (bx.HTTPClientError, bx.ConnectionError, bx.IncompleteReadError, ConnectionError)):
            return TRANSIENT
        return None


class GCSBackend(ObjectStoreBackend):
    """Google Cloud Storage: ``gs://bucket/key`` or keys in ``bucket_name``."""

    scheme = "gs"
    service = "GCS"

    @classmethod
    def aliases(cls) -> tuple[str, ...]:
        return ("gcs",)

    def _make_client(self) -> Any:
        with warnings.catch_warnings():  # google.api_core warns about Python 3.11's end of life at import
            warnings.simplefilter("ignore", FutureWarning)
            from google.cloud import storage

        if os.environ.get("STORAGE_EMULATOR_HOST"):
            return storage.Client(project=self.project or "emulator")  # anonymous, as the emulator expects
        return storage.Client(project=self.project)

    def _read(self, bucket: str, key: str) -> bytes:
        return self._client().bucket(bucket).blob(key).download_as_bytes(retry=None)

    def _stat(self, bucket: str, key: str) -> tuple[int, str] | None:
        blob = self._client().bucket(bucket).get_blob(key, retry=None)
        return None if blob is None else (int(blob.size or 0), str(blob.etag or blob.md5_hash or ""))

    def _classify(self, error: Exception) -> str | None:
        import google.auth.exceptions as gauth
        import requests
        from google.api_core import exceptions as gx

        if isinstance(error, gx.NotFound):
            return MISSING
        if isinstance(error, (gx.Forbidden, gx.Unauthorized, gauth.DefaultCredentialsError, gauth.RefreshError)):
            return DENIED
        if isinstance(error, (gx.ServerError, gx.TooManyRequests, gx.RequestRangeNotSatisfiable)):
            return TRANSIENT
        if isinstance(error, (requests.ConnectionError, requests.Timeout, gauth.TransportError, ConnectionError)):
            return TRANSIENT
        if type(error).__name__ == "DataCorruption":  # google-resumable-media's checksum mismatch
            return TRANSIENT
        return None


class FakeBackend(LocalBackend):
    """One generated image for every image path, for data-loading-free throughput runs.

    Annotation files (``get_local_path``, ``get_text``) still come from local disk. The default
    640x640 holds every COCO box; a smaller image clips boxes to nothing and the box loss to NaN.
    """

    def __init__(self, image_size: tuple[int, int] | list[int] = (640, 640), seed: int = 0) -> None:
        import cv2
        import numpy as np

        height, width = (int(v) for v in image_size)
        rng = np.random.default_rng(seed)
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        ok, encoded = cv2.imencode(".jpg", image)
        if not ok:
            raise UserError(f"fake backend: cannot encode a {height}x{width} image")
        self._image = encoded.tobytes()

    def get(self, filepath: str | Path) -> bytes:
        return self._image


class CheckedLocalBackend(LocalBackend):
    """mmengine's local-disk backend, with a missing file reported as the user's problem, by name."""

    def get(self, filepath: str | Path) -> bytes:
        try:
            return super().get(filepath)
        except FileNotFoundError:
            raise UserError(f"{filepath} does not exist") from None


def _s3_code(error: Any) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _describe(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _write_atomically(path: Path, data: bytes) -> None:
    """Readers never see half a file: write beside it, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _tree_size(root: Path | None) -> int:
    if root is None or not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


# mmengine maps "s3" to its Petrel (internal SenseTime) client by default; ours is boto3.
register_backend("s3", S3Backend, force=True, prefixes="s3")
register_backend("gcs", GCSBackend, force=True, prefixes=["gs", "gcs"])
register_backend("fake", FakeBackend, force=True)
register_backend("disk", CheckedLocalBackend, force=True)
register_backend("local", CheckedLocalBackend, force=True, prefixes="")

REMOTE_PREFIXES = ("s3://", "gs://", "gcs://")
# Keys the object-store backends take in backend_args: their constructor's (anything else is an error).
OPTIONS = frozenset(inspect.signature(ObjectStoreBackend.__init__).parameters) - {"self"}
REMOTE_BACKENDS = ("s3", "gcs")

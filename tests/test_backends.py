"""Training from S3 and GCS against real servers (moto_server, gcp-storage-emulator), no mocks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import det_mmdet, read_metrics, shapes_hparams, write_experiment
from object_stores import S3_ENV, Proxy, delete_s3, gcs_emulator, moto_server, upload_gcs, upload_s3

BUCKET = "det-mmdet-data"


@pytest.fixture(scope="module")
def stores(tmp_path_factory, shapes):
    """Both servers, each holding the shapes data set under ``shapes/``; no local copy is left."""
    logs = tmp_path_factory.mktemp("servers")
    copy = logs / "upload"
    shutil.copytree(shapes, copy)
    with moto_server(logs / "moto.log") as s3, gcs_emulator(logs / "gcs.log") as gcs:
        assert upload_s3(s3, BUCKET, copy, "shapes/") == upload_gcs(gcs, BUCKET, copy, "shapes/") == 67
        shutil.rmtree(copy)
        yield {"s3": s3, "gcs": gcs}


def run(tmp_path, stores, data_root, *args, data=None, s3=None, gcs=None, cache=None, name="run", **overrides):
    hparams = shapes_hparams(Path("unused"), **overrides)
    hparams["override_mmdet_config"]["data_root"] = data_root
    exp = write_experiment(tmp_path, hparams, name=f"{name}.yaml", **({"data": data} if data else {}))
    env = {
        **S3_ENV,
        "AWS_ENDPOINT_URL": s3 or stores["s3"],
        "STORAGE_EMULATOR_HOST": gcs or stores["gcs"],
        "XDG_CACHE_HOME": str(cache or tmp_path / "cache"),
    }
    out = tmp_path / name
    return det_mmdet("train", exp, "--output-dir", out, *args, env=env), out


def everything_written(out: Path) -> str:
    return "\n".join(f.read_text(errors="replace") for f in out.rglob("*") if f.is_file() and f.suffix != ".pth")


FORMS = {
    "s3-uri": ("s3://det-mmdet-data/shapes/", None),
    "s3-file_client_args": ("shapes/", {"file_client_args": {"backend": "s3", "bucket_name": BUCKET}}),
    "gcs-uri": ("gs://det-mmdet-data/shapes/", None),
    "gcs-file_client_args": ("shapes/", {"file_client_args": {"backend": "gcs", "bucket_name": BUCKET}}),
}


@pytest.mark.parametrize("form", FORMS)
def test_train_and_validate_from_a_bucket(tmp_path, stores, form):
    data_root, data = FORMS[form]
    r, out = run(tmp_path, stores, data_root, "--max-batches", 4, data=data)
    assert r.returncode == 0, r.stderr[-3000:]
    (validation,) = [x for x in read_metrics(out) if x["group"] == "validation"]
    assert validation["metrics"]["val_images"] == 16 and "bbox_mAP" in validation["metrics"]
    secret = S3_ENV["AWS_SECRET_ACCESS_KEY"]
    assert secret not in r.stdout + r.stderr and secret not in everything_written(out)


def test_missing_annotation_key_is_named(tmp_path, stores):
    r, _ = run(tmp_path, stores, "s3://det-mmdet-data/elsewhere/", "--max-batches", 2)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: s3://det-mmdet-data/elsewhere/annotations/train.json does not exist"
    ), r.stderr[-2000:]


def test_missing_image_in_a_loader_worker_is_named(tmp_path, stores, shapes):
    upload_s3(stores["s3"], "holes", shapes, "shapes/")
    delete_s3(stores["s3"], "holes", "shapes/train/train_00007.jpg")
    workers = {"train_dataloader.num_workers": 2, "train_dataloader.persistent_workers": True}
    r, _ = run(tmp_path, stores, "s3://holes/shapes/", "--max-batches", 12, **workers)
    assert r.returncode == 2
    assert "error: s3://holes/shapes/train/train_00007.jpg does not exist" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_flaky_server_retries_and_reads_every_image(tmp_path, stores):
    def rule(method: str, path: str, seen: int):
        # Every object fails first: 503, then (for images) a dropped connection, then it is served.
        if method == "GET" and path.endswith((".jpg", ".json")):
            return {0: 503, 1: "drop" if path.endswith(".jpg") else None}.get(seen)
        return None

    data = {"file_client_args": {"backend": "s3", "bucket_name": BUCKET, "backoff_s": 0.01}}
    with Proxy(stores["s3"], rule) as proxy:
        r, out = run(tmp_path, stores, "shapes/", "--max-batches", 12, data=data, s3=proxy.url)
    assert r.returncode == 0, r.stderr[-3000:]
    images = {p for (m, p) in proxy.seen if m == "GET" and p.endswith(".jpg")}
    assert len(images) == 64  # one epoch of 48 training images, then 16 validation images
    assert all(proxy.failed[("GET", p)] == 2 and proxy.served[("GET", p)] >= 1 for p in images)
    assert "retry 1/5" in r.stderr
    (validation,) = [x for x in read_metrics(out) if x["group"] == "validation"]
    assert validation["metrics"]["val_images"] == 16


def test_permission_denied_says_so(tmp_path, stores):
    def rule(method: str, path: str, seen: int):
        return 403 if path.endswith("train.json") else None

    with Proxy(stores["s3"], rule) as proxy:
        r, _ = run(tmp_path, stores, "s3://det-mmdet-data/shapes/", "--max-batches", 2, s3=proxy.url)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: permission denied checking s3://det-mmdet-data/shapes/annotations/train.json")
    assert last.endswith("check the S3 credentials")


def test_annotation_files_are_fetched_once_per_node_and_reused(tmp_path, stores):
    cache = tmp_path / "node-cache"
    with Proxy(stores["gcs"]) as proxy:
        first, _ = run(tmp_path, stores, "gs://det-mmdet-data/shapes/", "--max-batches", 2, "--slots", 2,
                       gcs=proxy.url, cache=cache, name="first")  # fmt: skip
        assert first.returncode == 0, first.stderr[-3000:]
        downloads = {p: n for (m, p), n in proxy.served.items() if p.endswith(".json") and "/download/" in p}
        # Two ranks, two datasets and the evaluator read them; each file crossed the network once.
        assert sorted(downloads.values()) == [1, 1], downloads
        second, _ = run(tmp_path, stores, "gs://det-mmdet-data/shapes/", "--max-batches", 2,
                        gcs=proxy.url, cache=cache, name="second")  # fmt: skip
        assert second.returncode == 0, second.stderr[-3000:]
        again = {p: n for (m, p), n in proxy.served.items() if p.endswith(".json") and "/download/" in p}
    assert again == downloads
    assert "using the cached copy of gs://det-mmdet-data/shapes/annotations/val.json" in second.stderr
    assert (cache / "det-mmdet/annotations/gs/det-mmdet-data/shapes/annotations/train.json").is_file()


def test_image_cache_serves_the_second_epoch(tmp_path, stores):
    cache = tmp_path / "images"
    with Proxy(stores["s3"]) as proxy:
        r, _ = run(tmp_path, stores, "s3://det-mmdet-data/shapes/", "--max-batches", 24, "--validation-period", 12,
                   data={"cache_dir": str(cache)}, s3=proxy.url)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    reads = {p: n for (m, p), n in proxy.served.items() if m == "GET" and p.endswith(".jpg")}
    assert len(reads) == 64 and set(reads.values()) == {1}  # 2 epochs and 2 validations, one read each
    assert len(list((cache / "objects").rglob("*.jpg"))) == 64


def test_fake_backend_trains_without_reading_images(tmp_path, stores, shapes):
    data = {"file_client_args": {"backend": "fake", "image_size": [128, 128]}}
    moved = tmp_path / "annotations-only"
    shutil.copytree(shapes / "annotations", moved / "annotations")
    r, out = run(tmp_path, stores, f"{moved}/", "--max-batches", 3, data=data)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["batches"] for x in read_metrics(out) if x["group"] == "validation"] == [3]


def test_retries_are_bounded_then_name_the_object(tmp_path, stores):
    def rule(method: str, path: str, seen: int):
        return 503 if method == "GET" and path.endswith("train.json") else None

    data = {"file_client_args": {"backend": "s3", "bucket_name": BUCKET, "max_attempts": 3, "backoff_s": 0.01}}
    with Proxy(stores["s3"], rule) as proxy:
        r, _ = run(tmp_path, stores, "shapes/", "--max-batches", 2, data=data, s3=proxy.url)
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: reading s3://det-mmdet-data/shapes/annotations/train.json failed 3 times; last error: ClientError"
        )
    )
    assert proxy.failed[("GET", f"/{BUCKET}/shapes/annotations/train.json")] == 3


def test_image_cache_stays_within_its_bound(tmp_path, stores, monkeypatch):
    from det_mmdet.backends import S3Backend

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": stores["s3"]}.items():
        monkeypatch.setenv(key, value)
    images = [f"s3://{BUCKET}/shapes/train/train_{i:05d}.jpg" for i in range(10)]
    one = len(S3Backend().get(images[0]))
    backend = S3Backend(cache_dir=str(tmp_path / "c"), cache_max_gb=3.5 * one / 1e9)
    data = [backend.get(uri) for uri in images]
    cached = sorted((tmp_path / "c").rglob("*.jpg"))
    assert 2 <= len(cached) <= 3 and sum(f.stat().st_size for f in cached) <= 3.5 * one
    assert [backend.get(uri) for uri in images] == data  # cached or not, the same bytes


def test_weights_and_prediction_inputs_from_a_bucket(tmp_path, stores, shapes, monkeypatch):
    import torch

    from det_mmdet import weights
    from det_mmdet.export import collect_inputs
    from object_stores import upload_s3

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": stores["s3"], "XDG_CACHE_HOME": str(tmp_path / "x")}.items():
        monkeypatch.setenv(key, value)
    src = tmp_path / "up"
    src.mkdir()
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, src / "w.pth")
    upload_s3(stores["s3"], "weights-bucket", src, "models/")
    local = weights.local_copy("s3://weights-bucket/models/w.pth")
    assert torch.equal(weights.read_state_dict(local, "s3://weights-bucket/models/w.pth")["w"], torch.arange(3.0))

    found = collect_inputs([f"s3://{BUCKET}/shapes/val/val_00003.jpg"], tmp_path / "scratch")
    assert found[0][0] == f"s3://{BUCKET}/shapes/val/val_00003.jpg"
    assert found[0][1].read_bytes() == (shapes / "val" / "val_00003.jpg").read_bytes()

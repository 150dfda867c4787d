"""Pretrained weights: metafile look-up, download through a mirror served locally, cache, lenient loading."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import det_mmdet, read_metrics, shapes_hparams, write_experiment
from det_mmdet import weights
from det_mmdet.checkpoint import newest_checkpoint
from det_mmdet.errors import UserError

FASTER_URL = (
    "https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_1x_coco/"
    "faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth"
)


@contextlib.contextmanager
def serve(directory: Path):
    """A local http.server over ``directory`` that counts GETs per path."""
    hits: Counter[str] = Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self):
            hits[self.path] += 1
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def tiny_model(num_classes: int):
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from det_mmdet.config import CONTEXT_DIR

    init_default_scope("mmdet")
    cfg = Config.fromfile(CONTEXT_DIR / "configs" / "shapes_faster_rcnn.py")
    cfg.model.roi_head.bbox_head.num_classes = num_classes
    torch.manual_seed(7)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def save_named_by_hash(state: dict, directory: Path, stem: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "tmp.pth"
    torch.save({"state_dict": state, "meta": {"note": "test weights"}}, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    return tmp.rename(directory / f"{stem}-{digest}.pth")


@pytest.fixture(scope="module")
def five_class_weights(tmp_path_factory):
    """Weights of the tiny detector with a 5-class head: everything but the box classifier fits 3 classes."""
    state = tiny_model(num_classes=5).state_dict()
    return save_named_by_hash(state, tmp_path_factory.mktemp("weights"), "tiny_five"), state


def test_use_pretrained_finds_the_metafile_url():
    root = weights.mmdet_config_root()
    assert weights.pretrained_url(root / "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py") == FASTER_URL
    url = weights.pretrained_url(root / "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py")
    assert url.startswith("https://download.openmmlab.com/mmdetection/v2.0/mask_rcnn/") and url.endswith(".pth")
    with pytest.raises(UserError, match="not one of mmdet's packaged configs"):
        weights.pretrained_url(Path("model_def/configs/shapes_faster_rcnn.py"))


def test_print_config_shows_the_pretrained_url(tmp_path):
    exp = write_experiment(
        tmp_path,
        {"global_batch_size": 2, "config_file": "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", "use_pretrained": True},
    )
    r = det_mmdet("train", exp, "--print-config")
    assert r.returncode == 0, r.stderr
    assert f"load_from = '{FASTER_URL}'" in r.stdout


def test_load_from_http_loads_matching_tensors_once_per_node(tmp_path, shapes, five_class_weights):
    path, state = five_class_weights
    env = {"DET_MMDET_CACHE": str(tmp_path / "cache")}
    with serve(path.parent) as (url, hits):
        source = f"{url}/{path.name}"
        hparams = shapes_hparams(shapes, **{"optim_wrapper.optimizer.lr": 0.0})
        hparams["load_from"] = source
        exp = write_experiment(tmp_path, hparams)
        r = det_mmdet("train", exp, "--output-dir", tmp_path / "a", "--max-batches", 2, "--slots", 2, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert hits[f"/{path.name}"] == 1  # two ranks, one download
        again = det_mmdet("train", exp, "--output-dir", tmp_path / "b", "--max-batches", 1, env=env)
        assert again.returncode == 0 and hits[f"/{path.name}"] == 1
    assert "pretrained weights from the cache" in again.stderr
    assert f"from {source}" in r.stderr and "skipped 4 whose shape differs" in r.stderr
    # lr 0: what training saved is exactly what was loaded, except the resized classifier.
    saved = torch.load(newest_checkpoint(tmp_path / "a" / "checkpoints") / "model.pth", weights_only=True)
    for key, value in saved["state_dict"].items():
        if key.startswith("roi_head.bbox_head.fc_"):
            assert value.shape != state[key].shape
        elif key in state and not key.rsplit(".", 1)[-1].startswith(("running_", "num_batches")):  # BN statistics move
            assert torch.equal(value, state[key]), key
    assert [x["batches"] for x in read_metrics(tmp_path / "a") if x["group"] == "validation"] == [2]


def test_mirror_replaces_openmmlab_and_the_name_hash_is_checked(tmp_path, monkeypatch):
    mirrored = tmp_path / "mirror" / FASTER_URL.removeprefix("https://download.openmmlab.com/")
    mirrored.parent.mkdir(parents=True)
    mirrored.write_bytes(b"not the real weights")
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    with serve(tmp_path / "mirror") as (url, hits):
        monkeypatch.setenv(weights.MIRROR_ENV, url)
        with pytest.raises(UserError, match=r"sha256 [0-9a-f]{8}\.\.\. does not match the 047c8118 in its name"):
            weights.download(FASTER_URL)
    assert hits["/" + mirrored.relative_to(tmp_path / "mirror").as_posix()] == 1
    assert not list((tmp_path / "cache").rglob("*.pth"))  # nothing unverified is kept


def test_no_network_and_no_cache_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(weights.MIRROR_ENV, "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(UserError, match=f"set {weights.MIRROR_ENV} to a mirror of https://download.openmmlab.com"):
        weights.download(FASTER_URL)


class NotATensor:
    pass


def test_a_checkpoint_with_arbitrary_objects_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": NotATensor()}, path)
    with pytest.raises(
        UserError, match="allow-list for mmengine checkpoints accepts: test_weights.NotATensor; it was not"
    ):
        weights.read_state_dict(path, str(path))


def test_load_from_a_missing_file_is_one_line_error(tmp_path, shapes):
    hparams = shapes_hparams(shapes)
    hparams["load_from"] = str(tmp_path / "nope.pth")
    r = det_mmdet("train", write_experiment(tmp_path, hparams), "--max-batches", 1, "--output-dir", tmp_path / "o")
    assert (
        r.returncode == 2
        and r.stderr.strip().splitlines()[-1] == f"error: load_from: {tmp_path}/nope.pth does not exist"
    )


def test_reading_a_runner_checkpoint_leaves_the_process_allow_list_as_it_was(tmp_path):
    from det_mmdet import checkpoint

    checkpoint.allow_numpy_rng_state()  # what the trial allows for Determined's own checkpoints
    before = set(torch.serialization.get_safe_globals())
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    weights.read_state_dict(path, str(path))
    assert set(torch.serialization.get_safe_globals()) == before

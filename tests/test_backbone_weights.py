"""Backbones' ImageNet checkpoints (``init_cfg=dict(type='Pretrained', ...)``) through the weights cache and mirrors.

mmdet's ResNet configs start from ``torchvision://resnet50``, RTMDet from a download.openmmlab.com URL;
here they are served by a local http.server (as a mirror) or put in the cache, never fetched from a hub.
"""

from __future__ import annotations

import pytest
import torch

from conftest import det_mmdet, shapes_hparams, write_experiment
from det_mmdet import weights
from det_mmdet.checkpoint import newest_checkpoint
from det_mmdet.errors import UserError
from test_weights import serve, tiny_model

R18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


def tiny_backbone_state() -> dict[str, torch.Tensor]:
    """The shapes detector's ResNet-18 (16 base channels) as an ImageNet checkpoint would hold it."""
    state = {k.removeprefix("backbone."): v for k, v in tiny_model(3).state_dict().items() if k.startswith("backbone.")}
    return {k: torch.full_like(v, 0.25) if k == "conv1.weight" else v for k, v in state.items()}


def train_from(tmp_path, shapes, checkpoint: str, env: dict, *extra: str):
    init = {"type": "const", "val": {"type": "Pretrained", "checkpoint": checkpoint}}  # a mapping value
    hp = shapes_hparams(shapes, **{"model.backbone.init_cfg": init, "optim_wrapper.optimizer.lr": 0.0})
    out = tmp_path / "run"
    r = det_mmdet("train", write_experiment(tmp_path, hp), "--output-dir", out, "--max-batches", 1, *extra, env=env)
    return r, out


def conv1(out) -> torch.Tensor:
    saved = torch.load(newest_checkpoint(out / "checkpoints") / "model.pth", weights_only=True)
    return saved["state_dict"]["backbone.conv1.weight"]


def test_torchvision_scheme_reads_mmengines_table_and_the_cache(tmp_path, shapes):
    """``torchvision://resnet18``: mmengine's URL table, then the cache."""
    cache = tmp_path / "cache"
    cached = cache / "weights" / R18_URL.split("://", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save(tiny_backbone_state(), cached)
    r, out = train_from(tmp_path, shapes, "torchvision://resnet18", {weights.CACHE_ENV: str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pretrained weights from the cache" in r.stderr
    assert torch.equal(conv1(out), torch.full_like(conv1(out), 0.25))  # lr 0: the backbone is the checkpoint's


def test_openmmlab_url_through_the_mirror_once_per_node(tmp_path, shapes):
    url = "https://download.openmmlab.com/pretrain/tests/tiny_r18_imagenet.pth"
    served = tmp_path / "mirror" / "pretrain" / "tests" / "tiny_r18_imagenet.pth"
    served.parent.mkdir(parents=True)
    torch.save({"state_dict": tiny_backbone_state()}, served)
    env = {weights.CACHE_ENV: str(tmp_path / "cache")}
    with serve(tmp_path / "mirror") as (mirror, hits):
        env[weights.MIRROR_ENV] = mirror
        r, out = train_from(tmp_path, shapes, url, env, "--slots", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert hits["/pretrain/tests/tiny_r18_imagenet.pth"] == 1  # two ranks, one download (the cache's lock)
    assert torch.equal(conv1(out), torch.full_like(conv1(out), 0.25))


def test_torchvision_mirror_and_hash_check(tmp_path, monkeypatch):
    served = tmp_path / "mirror" / "models" / "resnet18-f37072fd.pth"
    served.parent.mkdir(parents=True)
    torch.save(tiny_backbone_state(), served)  # not torchvision's file: its sha256 cannot start with f37072fd
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    with serve(tmp_path / "mirror") as (mirror, hits):
        monkeypatch.setenv(weights.TORCHVISION_MIRROR_ENV, mirror)
        with pytest.raises(UserError, match=r"resnet18-f37072fd.pth: sha256 [0-9a-f]{8}\.\.\. does not match"):
            weights.resolve_checkpoint("torchvision://resnet18", "model.backbone.init_cfg.checkpoint")
    assert hits["/models/resnet18-f37072fd.pth"] == 1


def test_unreachable_backbone_says_which_key_and_what_to_set(tmp_path, shapes):
    env = {weights.CACHE_ENV: str(tmp_path / "cache"), weights.TORCHVISION_MIRROR_ENV: "http://127.0.0.1:9"}
    r, _ = train_from(tmp_path, shapes, "torchvision://resnet18", env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.backbone.init_cfg.checkpoint: cannot download http://127.0.0.1:9/models/")
    assert f"set {weights.TORCHVISION_MIRROR_ENV} to a mirror of https://download.pytorch.org" in last


def test_scheme_names_come_from_mmengines_tables():
    import mmengine
    from mmengine.runner.checkpoint import get_external_models

    assert (
        weights.scheme_url("open-mmlab://detectron2/resnet50_caffe", "x")
        == get_external_models()["detectron2/resnet50_caffe"]
    )
    assert (
        weights.scheme_url("torchvision://resnet50", "x") == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    )
    assert weights.scheme_url("s3://bucket/r50.pth", "x") == "s3://bucket/r50.pth"
    with pytest.raises(
        UserError, match=r"^model.backbone.init_cfg.checkpoint: torchvision://resnet5: mmengine knows no"
    ):
        weights.scheme_url("torchvision://resnet5", "model.backbone.init_cfg.checkpoint")
    assert mmengine.__version__  # the tables are mmengine's own, shipped with the pinned release


def test_torchvision_is_installed_with_its_ops_and_weight_tables():
    """torchvision matches the pinned torch: its C++ ops run, and torchvision:// names its weights enums."""
    import torchvision
    from torchvision.models import ResNet18_Weights
    from torchvision.ops import nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    url = ResNet18_Weights.IMAGENET1K_V1.url
    assert url == R18_URL, torchvision.__version__
    for name in ("resnet18", "resnet18.imagenet1k_v1", "resnet18.default"):  # as mmengine's loader names them
        assert weights.scheme_url(f"torchvision://{name}", "x") == url, name


def test_load_from_that_covers_the_backbone_skips_its_imagenet_download(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(weights.TORCHVISION_MIRROR_ENV, "http://127.0.0.1:9")  # a download would fail
    model = tiny_model(3)
    model.backbone.init_cfg = {"type": "Pretrained", "checkpoint": "torchvision://resnet18"}
    weights.resolve_pretrained_inits(model, load_from=model.state_dict())
    assert model.backbone.init_cfg is None
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.layer4")}
    model.backbone.init_cfg = {"type": "Pretrained", "checkpoint": "torchvision://resnet18"}
    with pytest.raises(UserError, match="model.backbone.init_cfg.checkpoint: cannot download"):
        weights.resolve_pretrained_inits(model, load_from=partial)

"""Config resolution against the real installed mmdet: names, merges, overrides, search spaces, errors."""

from __future__ import annotations

import pytest

from conftest import det_mmdet, write_experiment
from det_mmdet.cli import main
from det_mmdet.config import build_config, experiment_from_dict, load_experiment, parse_set

FASTER = "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
MASK = "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"
RETINA = "retinanet/retinanet_r50_fpn_1x_coco.py"


def resolve(hparams: dict, sets: dict | None = None, data: dict | None = None):
    raw = {"hyperparameters": {"global_batch_size": 2, **hparams}}
    if data is not None:
        raw["data"] = data
    return build_config(experiment_from_dict(raw), sets)


@pytest.mark.parametrize(
    "config_file, model_type, metric",
    [
        (FASTER, "FasterRCNN", "bbox"),
        (MASK, "MaskRCNN", ["bbox", "segm"]),
        (RETINA, "RetinaNet", "bbox"),
        ("mmdet::" + FASTER, "FasterRCNN", "bbox"),
    ],
)
def test_packaged_configs_resolve_by_name(config_file, model_type, metric):
    cfg = resolve({"config_file": config_file})
    assert cfg.model.type == model_type
    assert cfg.val_evaluator.metric == metric
    assert cfg.train_dataloader.dataset.type == "CocoDataset"


def test_config_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.py").write_text(
        "_base_ = 'mmdet::" + RETINA + "'\nmodel = dict(bbox_head=dict(num_classes=3))\n"
    )
    monkeypatch.setenv("MMDETECTION_CONFIG_DIR", str(tmp_path))
    cfg = resolve({"config_file": "mine/x.py"})
    assert cfg.model.bbox_head.num_classes == 3


def test_merge_config_with_delete_replaces_the_optimizer(tmp_path):
    merge = tmp_path / "adamw.py"
    merge.write_text(
        "optim_wrapper = dict(_delete_=True, type='OptimWrapper',\n"
        "                     optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05))\n"
    )
    cfg = resolve({"config_file": FASTER, "merge_config": str(merge)})
    assert cfg.optim_wrapper.optimizer.to_dict() == {"type": "AdamW", "lr": 1e-4, "weight_decay": 0.05}
    # without _delete_ the SGD keys would have survived the merge
    merge.write_text("optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-4))\n")
    assert resolve({"config_file": FASTER, "merge_config": str(merge)}).optim_wrapper.optimizer.momentum == 0.9


def test_yaml_merge_config(tmp_path):
    merge = tmp_path / "m.yaml"
    merge.write_text("model:\n  roi_head:\n    bbox_head:\n      num_classes: 7\n")
    assert resolve({"config_file": FASTER, "merge_config": str(merge)}).model.roi_head.bbox_head.num_classes == 7


def test_override_order_merge_then_override_then_set(tmp_path):
    merge = tmp_path / "lr.py"
    merge.write_text("optim_wrapper = dict(optimizer=dict(lr=0.1))\n")
    hp = {"config_file": FASTER, "merge_config": str(merge)}
    assert resolve(hp).optim_wrapper.optimizer.lr == 0.1
    hp["override_mmdet_config"] = {"optim_wrapper.optimizer.lr": 0.2}
    assert resolve(hp).optim_wrapper.optimizer.lr == 0.2
    assert resolve(hp, parse_set(["optim_wrapper.optimizer.lr=0.3"])).optim_wrapper.optimizer.lr == 0.3


def test_list_index_and_nested_overrides():
    cfg = resolve(
        {
            "config_file": FASTER,
            "override_mmdet_config": {
                "train_dataloader.dataset.pipeline.2.scale": [320, 320],
                # Determined hands nested hyperparameters as nested mappings: same meaning as dotted keys
                "model": {"roi_head": {"bbox_head": {"num_classes": 5}}},
            },
        }
    )
    assert cfg.train_dataloader.dataset.pipeline[2].type == "Resize"
    assert list(cfg.train_dataloader.dataset.pipeline[2].scale) == [320, 320]
    assert cfg.model.roi_head.bbox_head.num_classes == 5
    assert cfg.model.roi_head.bbox_head.type == "Shared2FCBBoxHead"  # merged, not replaced


def test_values_are_data_not_code():
    cfg = resolve({"config_file": FASTER}, parse_set(["work_dir=__import__('os').getcwd()"]))
    assert cfg.work_dir == "__import__('os').getcwd()"


def test_search_spaces_resolve_to_documented_local_values(caplog):
    exp = experiment_from_dict(
        {
            "hyperparameters": {
                "global_batch_size": {"type": "const", "val": 4},
                "config_file": FASTER,
                "override_mmdet_config": {
                    "optim_wrapper.optimizer.lr": {"type": "log", "minval": -4, "maxval": -2, "base": 10},
                    "optim_wrapper.optimizer.weight_decay": {"type": "double", "minval": 0.0, "maxval": 0.001},
                    "train_dataloader.num_workers": {"type": "int", "minval": 2, "maxval": 6},
                    "optim_wrapper.optimizer.type": {"type": "categorical", "vals": ["AdamW", "SGD"]},
                },
            }
        }
    )
    cfg = build_config(exp)
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(1e-3)
    assert cfg.optim_wrapper.optimizer.weight_decay == pytest.approx(5e-4)
    assert cfg.train_dataloader.num_workers == 4
    assert cfg.optim_wrapper.optimizer.type == "AdamW"
    assert exp.hparams["global_batch_size"] == 4
    assert any("log search space" in n and "midpoint" in n for n in exp.notes)


def test_data_root_override_reaches_datasets_and_evaluator():
    cfg = resolve({"config_file": FASTER, "override_mmdet_config": {"data_root": "/data/coco"}})
    assert cfg.train_dataloader.dataset.data_root == "/data/coco/"
    assert cfg.val_dataloader.dataset.data_root == "/data/coco/"
    assert cfg.val_evaluator.ann_file == "/data/coco/annotations/instances_val2017.json"


def test_file_client_args_substituted_everywhere():
    cfg = resolve({"config_file": MASK}, data={"file_client_args": {"backend": "s3", "bucket_name": "b"}})
    want = {"backend": "s3", "bucket_name": "b"}
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        assert loader.dataset.backend_args == want
        readers = [s for s in loader.dataset.pipeline if s.type.startswith("Load")]
        assert readers and all(s.backend_args == want for s in readers if s.type == "LoadImageFromFile")
    assert cfg.val_evaluator.backend_args == want
    disk = resolve({"config_file": MASK}, data={"file_client_args": {"backend": "disk"}})
    assert disk.val_evaluator.backend_args is None


def test_print_config_prints_resolved_text_and_hides_secrets(tmp_path, capsys):
    exp = write_experiment(
        tmp_path,
        {
            "global_batch_size": 2,
            "config_file": FASTER,
            "override_mmdet_config": {"optim_wrapper.optimizer.lr": 0.0123, "env_cfg.api_token": "SECRET123"},
        },
    )
    assert main(["train", str(exp), "--print-config", "--set", "train_cfg.max_epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "lr=0.0123" in out and "max_epochs=3" in out
    assert "SECRET123" not in out


@pytest.mark.parametrize(
    "data, message",
    [
        ({"backend_args": {"backend": "s3", "aws_secret_access_key": "SECRET123"}}, "credentials do not belong"),
        ({"file_client_args": {"backend": "s4"}}, "backend 's4' is not one of: disk, fake, gcs,"),
        ({"file_client_args": {"backend": "gcs", "bucket": "b"}}, "data.file_client_args.bucket: unknown option"),
        ({"cache_dir": "/tmp/c"}, "data.cache_dir: caching applies to s3 or gcs data"),
        ({"cach_dir": "/tmp/c"}, "data.cach_dir: unknown key; allowed: backend_args,"),
    ],
)
def test_bad_data_section_is_one_line_error(tmp_path, capsys, data, message):
    exp = write_experiment(tmp_path, {"global_batch_size": 2, "config_file": FASTER}, data=data)
    assert main(["train", str(exp), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert "SECRET123" not in err


def test_cache_dir_goes_to_remote_readers():
    cfg = resolve(
        {"config_file": FASTER, "override_mmdet_config": {"data_root": "s3://bucket/coco/"}},
        data={"cache_dir": "/tmp/cache", "cache_max_gb": 2},
    )
    want = {"cache_dir": "/tmp/cache", "cache_max_gb": 2}
    assert cfg.train_dataloader.dataset.backend_args == want and cfg.val_evaluator.backend_args == want
    assert cfg.val_evaluator.ann_file == "s3://bucket/coco/annotations/instances_val2017.json"


def test_console_script_print_config(tmp_path):
    exp = write_experiment(tmp_path, {"global_batch_size": 2, "config_file": RETINA})
    r = det_mmdet("train", exp, "--print-config")
    assert r.returncode == 0, r.stderr
    assert "type='RetinaNet'" in r.stdout


BAD = [
    (
        "missing config_file",
        {"config_file": "faster_rcnn/nope.py"},
        [],
        ["config_file 'faster_rcnn/nope.py' not found", "looked in", ".mim/configs"],
    ),
    ("missing merge_config", {"config_file": FASTER, "merge_config": "nowhere.py"}, [], ["merge_config 'nowhere.py'"]),
    ("merge_config syntax", {"config_file": FASTER, "merge_config": "@broken"}, [], ["syntax error at line 2"]),
    (
        "parent not a mapping",
        {"config_file": FASTER, "override_mmdet_config": {"model.backbone.depth.x": 1}},
        [],
        ["'model.backbone.depth' is 50, not a mapping"],
    ),
    (
        "top-level typo",
        {"config_file": FASTER, "override_mmdet_config": {"optim_wraper.optimizer.lr": 1}},
        [],
        ["unknown key 'optim_wraper.optimizer.lr'", "did you mean 'optim_wrapper'"],
    ),
    (
        "list index",
        {"config_file": FASTER, "override_mmdet_config": {"train_dataloader.dataset.pipeline.9.x": 1}},
        [],
        ["'train_dataloader.dataset.pipeline.9' is not an index of a list of 5"],
    ),
    ("no global_batch_size", {"config_file": FASTER, "global_batch_size": None}, [], ["global_batch_size is required"]),
    (
        "bad search space",
        {"config_file": FASTER, "override_mmdet_config": {"model.backbone": {"type": "ResNet"}}},
        [],
        ["type 'ResNet' is not a Determined search space"],
    ),
    ("bad --set", {"config_file": FASTER}, ["--set", "nonsense"], ["--set 'nonsense': expected key=value"]),
    ("typo in --set", {"config_file": FASTER}, ["--set", "modle.x=1"], ["--set: unknown key 'modle.x'", "'model'"]),
]


@pytest.mark.parametrize("case, hparams, extra, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(tmp_path, capsys, case, hparams, extra, expected):
    (tmp_path / "broken.py").write_text("x = 1\ny = = 2\n")
    hp = {"global_batch_size": 2, **hparams}
    if "merge_config" in hp and hp["merge_config"].startswith("@"):
        hp["merge_config"] = str(tmp_path / "broken.py")
    hp = {k: v for k, v in hp.items() if v is not None}
    exp = write_experiment(tmp_path, hp)
    assert main(["train", str(exp), "--print-config", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for text in expected:
        assert text in err


def test_experiment_yaml_that_does_not_parse(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hyperparameters:\n  config_file: [unclosed\n  x: 1\n")
    assert main(["train", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid YAML at line" in err and "\n" not in err
    assert main(["train", str(tmp_path / "absent.yaml"), "--print-config"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_local_choice_of_search_space_is_logged(tmp_path, capsys):
    exp = write_experiment(
        tmp_path,
        {
            "global_batch_size": 2,
            "config_file": FASTER,
            "override_mmdet_config": {"optim_wrapper.optimizer.lr": {"type": "double", "minval": 0.01, "maxval": 0.03}},
        },
    )
    note = "hyperparameter override_mmdet_config.optim_wrapper.optimizer.lr: double search space -> 0.02 locally"
    assert load_experiment(exp).notes == [note + " (midpoint)"]
    assert main(["train", str(exp), "--print-config"]) == 0
    captured = capsys.readouterr()
    assert note in captured.err and "lr=0.02" in captured.out


def test_a_list_given_where_the_config_has_a_tuple_becomes_a_tuple():
    """YAML has no tuples; RandomResize reads a list scale as a choice among scales, a tuple as one scale."""
    rtmdet = "rtmdet/rtmdet_tiny_8xb32-300e_coco.py"
    sets = parse_set(["train_dataloader.dataset.pipeline.3.scale=[320, 320]"])
    cfg = resolve({"config_file": rtmdet, "override_mmdet_config": {"train_pipeline_stage2.2.scale": [256, 256]}}, sets)
    step = cfg.train_dataloader.dataset.pipeline[3]
    assert step.type == "RandomResize" and step.scale == (320, 320) and isinstance(step.scale, tuple)
    assert cfg.train_pipeline_stage2[2].scale == (256, 256)
    # Test pipelines too: Resize (1333, 800) given as a YAML list.
    cfg = resolve({"config_file": FASTER, "override_mmdet_config": {"test_pipeline.1.scale": [666, 400]}})
    assert cfg.test_pipeline[1].scale == (666, 400)
    from mmdet.registry import TRANSFORMS
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    TRANSFORMS.build(cfg.test_pipeline[1])  # built as mmdet builds it
    resize = TRANSFORMS.build(dict(step))
    assert resize.scale == (320, 320)

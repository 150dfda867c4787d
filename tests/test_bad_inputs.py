"""Bad input, end to end: one line naming the thing, a non-zero exit, no traceback, or a logged count.

Each case builds what a user might really hand us (a broken file, a wrong key, a damaged data set)
and runs ``det-mmdet`` the way a user does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import det_mmdet, shapes_hparams, write_experiment

FASTER = "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"


@dataclass
class Case:
    name: str
    # (tmp_path, a private copy of the shapes data set) -> det-mmdet arguments
    build: Callable[[Path, Path], list]
    expected: str  # in the last line of stderr (for skips: anywhere in stderr)
    env: dict = field(default_factory=dict)
    exit_code: int = 2


def exp(tmp: Path, data: Path, data_section: dict | None = None, **overrides) -> Path:
    return write_experiment(tmp, shapes_hparams(data, **overrides), **({"data": data_section} if data_section else {}))


def hp(tmp: Path, hparams: dict, **extra) -> Path:
    return write_experiment(tmp, hparams, **extra)


def train(path: Path, tmp: Path, *extra) -> list:
    return ["train", path, "--output-dir", tmp / "out", "--max-batches", 12, *extra]


def edit_annotations(data: Path, change: Callable[[dict], None]) -> None:
    path = data / "annotations" / "train.json"
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))


def bad_boxes(coco: dict) -> None:
    coco["annotations"][0]["bbox"] = [300.0, 300.0, 10.0, 10.0]  # outside the 128-px image
    coco["annotations"][1]["bbox"] = [10.0, 10.0, -5.0, 8.0]  # x2 < x1


NO_AWS = {
    "AWS_ACCESS_KEY_ID": "",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
}
S3_FAST_FAIL = {"file_client_args": {"backend": "s3", "bucket_name": "b", "max_attempts": 2, "backoff_s": 0.01}}

CASES = [
    Case("yaml that does not parse", lambda t, d: ["train", _write(t / "x.yaml", "name: [unclosed\n")],
         "x.yaml: invalid YAML at line 2"),
    Case("experiment file missing", lambda t, d: ["train", t / "nope.yaml"], "nope.yaml"),
    Case("unknown config_file",
         lambda t, d: ["train", hp(t, {"global_batch_size": 2, "config_file": "faster/nope.py"})],
         "config_file 'faster/nope.py' not found"),
    Case("typo in an override", lambda t, d: ["train", hp(t, {"global_batch_size": 2, "config_file": FASTER,
                                                              "override_mmdet_config": {"optim_wraper.lr": 1}})],
         "did you mean 'optim_wrapper'"),
    Case("merge_config syntax error",
         lambda t, d: ["train", hp(t, {"global_batch_size": 2, "config_file": FASTER,
                                       "merge_config": str(_write(t / "m.py", "a = (\n"))})],
         "m.py"),
    Case("global_batch_size missing", lambda t, d: ["train", hp(t, {"config_file": FASTER})],
         "hyperparameters.global_batch_size is required"),
    Case("unknown model type", lambda t, d: train(exp(t, d, **{"model.type": "FasterRCNNN"}), t),
         "FasterRCNNN"),
    Case("credentials in the experiment", lambda t, d: train(exp(t, d, {"backend_args": {
        "backend": "s3", "aws_secret_access_key": "x"}}), t), "credentials do not belong in the experiment"),
    Case("bad knob value", lambda t, d: ["train", hp(t, {"global_batch_size": 2, "config_file": FASTER,
                                                         "optimizer": "rmsprop"})],
         "hyperparameters.optimizer: 'rmsprop' is not one of sgd, adamw, adam, adagrad"),
    Case("non-positive length", lambda t, d: ["train", exp(t, d), "--max-batches", "0"],
         "--max-batches must be a positive number"),
    Case("batch not divisible by slots", lambda t, d: ["train", exp(t, d), "--max-batches", 2, "--slots", 3],
         "global_batch_size 4 is not divisible by 3 slots"),
    Case("resume without a checkpoint", lambda t, d: ["train", exp(t, d), "--output-dir", t / "o", "--resume"],
         "--resume: no complete checkpoint"),
    Case("data_root without annotations", lambda t, d: train(exp(t, d, data_root=f"{t}/empty/"), t),
         "annotations/train.json"),
    Case("empty annotation file", lambda t, d: [_write(d / "annotations" / "train.json", ""), *train(exp(t, d), t)][1:],
         "train.json is not valid JSON"),
    Case("num_classes differs from the annotation file",
         lambda t, d: train(exp(t, d, **{"model.roi_head.bbox_head.num_classes": 5}), t),
         "model.roi_head.bbox_head.num_classes is 5 but the training set has 3 classes"),
    Case("class names absent from the annotation file",
         lambda t, d: train(exp(t, d, **{"train_dataloader.dataset.metainfo.classes": ["circle", "square", "hexagon"]}),
                            t),
         "classes not in"),
    Case("annotation image ids that match no image",
         lambda t, d: [edit_annotations(d, lambda c: c["annotations"].append({**c["annotations"][0], "id": 99999,
                                                                              "image_id": 4242})),
                       *train(exp(t, d), t)][1:],
         "refer to image ids that are not in its images (e.g. annotation 99999 -> image_id 4242)"),
    Case("missing image", lambda t, d: [(d / "train" / "train_00003.jpg").unlink(), *train(exp(t, d), t)][1:],
         "train_00003.jpg does not exist"),
    Case("corrupt JPEG", lambda t, d: [_write(d / "train" / "train_00005.jpg", "not a jpeg"), *train(exp(t, d), t)][1:],
         "train_00005.jpg: cannot decode the image (corrupt, truncated or not an image)"),
    Case("unreachable bucket", lambda t, d: train(exp(t, d, S3_FAST_FAIL, data_root="shapes/"), t),
         "checking s3://b/shapes/annotations/train.json failed 2 times; last error: EndpointConnectionError",
         env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}),
    Case("no credentials for the bucket", lambda t, d: train(exp(t, d, data_root="s3://b/shapes/"), t),
         "permission denied checking s3://b/shapes/annotations/train.json (NoCredentialsError", env=NO_AWS),
    Case("non-finite loss", lambda t, d: train(exp(t, d, **{"model.rpn_head.loss_cls.loss_weight": float("nan")}), t),
         "non-finite loss nan at batch 0 (epoch 0)"),
    Case("boxes with x2 < x1 or outside the image (mmdet skips them: counted)",
         lambda t, d: [edit_annotations(d, bad_boxes), *train(exp(t, d), t, "--max-batches", 2)][1:],
         "train_dataloader.dataset: mmdet skipped 2 of", exit_code=0),
]  # fmt: skip


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(tmp_path, shapes, case):
    data = tmp_path / "shapes"
    shutil.copytree(shapes, data)
    args = case.build(tmp_path, data)
    r = det_mmdet(*args, env=case.env)
    assert r.returncode == case.exit_code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if case.exit_code == 0:
        assert case.expected in r.stderr
        return
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and case.expected in last, r.stderr[-2000:]


def test_experiment_yaml_is_data_not_code(tmp_path):
    # A YAML tag that would construct Python objects is refused by the safe loader, in one line.
    path = _write(tmp_path / "evil.yaml", "name: !!python/object/apply:os.system ['echo pwned']\n")
    r = det_mmdet("train", path, "--print-config")
    assert r.returncode == 2 and "pwned" not in r.stdout and "Traceback" not in r.stderr

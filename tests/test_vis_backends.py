"""visualizer.vis_backends: the scalars the trial reports to Determined reach mmengine's backends too."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import det_mmdet, read_metrics, shapes_hparams, write_experiment

# mlflow 3 refuses its file store (maintenance mode) unless asked; the test needs no server or database.
FILE_STORE = {"MLFLOW_ALLOW_FILE_STORE": "true"}


def tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return scalars


def test_tensorboard_mlflow_and_local_backends_get_the_reported_scalars(tmp_path, shapes, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    backends = [
        {"type": "TensorboardVisBackend"},
        {"type": "MLflowVisBackend", "tracking_uri": store, "exp_name": "shapes", "run_name": "tiny"},
        {"type": "LocalVisBackend"},
    ]
    exp = write_experiment(tmp_path, shapes_hparams(shapes, **{"visualizer.vis_backends": backends}))
    out = tmp_path / "run"
    args = ("--output-dir", out, "--max-batches", 2, "--validation-period", 2, "--report-period", 1)
    r = det_mmdet("train", exp, *args, env=FILE_STORE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"vis_backends: training and validation scalars also go to TensorboardVisBackend ({out / 'vis_data'})" in (
        r.stderr
    )
    reports = read_metrics(out)
    training = {x["batches"]: x["metrics"] for x in reports if x["group"] == "training"}
    (validation,) = [x for x in reports if x["group"] == "validation"]
    assert sorted(training) == [1, 2] and validation["batches"] == 2

    # TensorBoard: mmengine's names (loss terms, lr; coco/ for the metrics), at the batches trained.
    scalars = tensorboard_scalars(out / "vis_data")
    for step, metrics in training.items():
        for name in ("loss", "loss_rpn_cls", "loss_bbox", "acc", "lr"):
            assert scalars[name][step] == pytest.approx(metrics[name], rel=1e-5), name
    assert scalars["coco/bbox_mAP"] == {2: pytest.approx(validation["metrics"]["bbox_mAP"], abs=1e-6)}
    assert scalars["coco/bbox_mAP_50"][2] == pytest.approx(validation["metrics"]["bbox_mAP_50"], abs=1e-6)

    # MLflow's file store: the same series, the config as parameters and as config.py.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("shapes").experiment_id])
    assert run.info.status == "FINISHED"  # closed at the end of training
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert loss == {step: pytest.approx(m["loss"], rel=1e-6) for step, m in training.items()}
    (mAP,) = client.get_metric_history(run.info.run_id, "coco/bbox_mAP")
    assert (mAP.step, mAP.value) == (2, pytest.approx(validation["metrics"]["bbox_mAP"], abs=1e-6))
    assert run.data.params["model.type"] == "FasterRCNN" and run.data.tags["mlflow.runName"] == "tiny"
    assert "config.py" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # LocalVisBackend: mmengine's scalars.json and config.py under vis_data.
    lines = [json.loads(line) for line in (out / "vis_data" / "scalars.json").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]
    assert [x["step"] for x in lines if "coco/bbox_mAP" in x] == [2]
    assert "FasterRCNN" in (out / "vis_data" / "config.py").read_text()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_backend_whose_package_is_missing_is_one_line_at_start_up(tmp_path, shapes):
    backends = [{"type": "TensorboardVisBackend"}, {"type": "WandbVisBackend", "init_kwargs": {"project": "x"}}]
    exp = write_experiment(tmp_path, shapes_hparams(shapes, **{"visualizer.vis_backends": backends}))
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "run", "--max-batches", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: visualizer.vis_backends: WandbVisBackend needs the wandb package, which is not installed: "
        "pip install wandb"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before any training


def test_an_unknown_or_twice_named_backend_is_one_line(tmp_path):
    from mmengine.registry import init_default_scope

    from det_mmdet import vis_backends
    from det_mmdet.errors import UserError

    init_default_scope("mmdet")
    with pytest.raises(UserError, match=r"visualizer.vis_backends\[1\]: .*NopeVisBackend"):
        vis_backends.build([{"type": "LocalVisBackend"}, {"type": "NopeVisBackend"}], tmp_path)
    with pytest.raises(UserError, match="two backends named 'LocalVisBackend'; give one a name"):
        vis_backends.build([{"type": "LocalVisBackend"}, {"type": "LocalVisBackend"}], tmp_path)
    built = vis_backends.build([{"type": "LocalVisBackend"}, {"type": "LocalVisBackend", "name": "copy"}], tmp_path)
    assert list(built) == ["LocalVisBackend", "copy"] and built["copy"]._save_dir == str(tmp_path)

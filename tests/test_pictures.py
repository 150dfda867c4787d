"""Validation pictures in TensorBoard (and PNG locally), and the training/validation scalars beside them."""

from __future__ import annotations

from conftest import det_mmdet, read_metrics, shapes_hparams, write_experiment


def event_data(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images, scalars = {}, {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        images.update({tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]})
        scalars.update({tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]})
    return images, scalars


def test_each_validation_draws_the_same_images_into_tensorboard(tmp_path, shapes):
    exp = write_experiment(tmp_path, {**shapes_hparams(shapes), "validation_pictures": 3})
    out = tmp_path / "run"
    r = det_mmdet("train", exp, "--output-dir", out, "--max-batches", 4, "--validation-period", 2, "--report-period", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    images, scalars = event_data(out / "tensorboard")
    assert len(images) == 3 and all(tag.startswith("validation/val_") for tag in images)
    assert all(steps == [2, 4] for steps in images.values())  # one picture per image and validation
    assert scalars["training/loss"] == [2, 4] and scalars["validation/bbox_mAP"] == [2, 4]
    for step in (2, 4):
        pngs = sorted(p.name for p in (out / "vis" / str(step)).glob("*.png"))
        assert pngs == sorted(tag.removeprefix("validation/").replace(".jpg", ".png") for tag in images)


def test_no_pictures_when_turned_off(tmp_path, shapes):
    exp = write_experiment(tmp_path, {**shapes_hparams(shapes), "validation_pictures": 0})
    out = tmp_path / "run"
    r = det_mmdet("train", exp, "--output-dir", out, "--max-batches", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "vis").exists()
    images, scalars = event_data(out / "tensorboard")
    assert not images and "validation/bbox_mAP" in scalars


def test_drawing_leaves_the_training_randomness_alone(tmp_path, shapes):
    """mmdet's visualizer jitters mask colours with numpy's global RNG; with pictures on or off, training
    draws the same flips."""
    losses = {}
    for count in (0, 2):
        hparams = {**shapes_hparams(shapes, "configs/shapes_mask_rcnn.py"), "validation_pictures": count}
        exp = write_experiment(tmp_path, hparams, name=f"{count}.yaml")
        out = tmp_path / f"run{count}"
        r = det_mmdet(
            "train", exp, "--output-dir", out, "--max-batches", 4, "--validation-period", 2, "--report-period", 1
        )
        assert r.returncode == 0, r.stderr[-3000:]
        losses[count] = [x["metrics"]["loss"] for x in read_metrics(out) if x["group"] == "training"]
    assert losses[0] == losses[2]  # batches 3 and 4 come after a validation that drew pictures

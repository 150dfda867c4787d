"""mmdet's own RTMDet and YOLOX configs (shrunk) under det-mmdet and under mmengine's Runner, side by side.

Both trainers get the same resolved config (``det-mmdet train --print-config``), the same starting
weights (``load_from``), the same batches in the same order (no shuffling, pipelines without random
steps) and ``tests/recording_hooks.py``'s ``RecordHook``, which writes what each batch looked like:
its image shapes, its losses, the MessageHub's ``iter``/``epoch``. The pipeline switch of each config
comes early, so the records show it reaching the data-loader workers (two persistent workers here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, det_mmdet, read_metrics, shapes_hparams, write_experiment
from det_mmdet.checkpoint import newest_checkpoint

TESTS = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}

# Deterministic steps only, so that both trainers see the same pixels; the size tells the stages apart.
STAGE1 = [
    {"type": "LoadImageFromFile"},
    {"type": "LoadAnnotations", "with_bbox": True},
    {"type": "Resize", "scale": 128, "keep_ratio": True},
    {"type": "PackDetInputs"},
]
STAGE2 = [*STAGE1[:2], {"type": "Resize", "scale": 96, "keep_ratio": True}, STAGE1[-1]]
EPOCH = 6  # batches per epoch: 48 images, 8 per batch


def parity_overrides(record: Path) -> dict:
    loader = {
        "train_dataloader.num_workers": 2,
        "train_dataloader.persistent_workers": True,
        "train_dataloader.sampler.shuffle": False,
        "train_cfg.max_epochs": 4,
        "train_cfg.val_interval": 2,  # and the configs' dynamic_intervals [(4, 1)]
        "default_hooks.checkpoint.interval": 1,  # the Runner's epoch_2.pth, for the resume tests
    }
    return {**loader, "custom_imports": {"imports": ["recording_hooks"], "allow_failed_imports": False}}


def rtmdet_hparams(shapes: Path, record: Path, start: Path) -> dict:
    hooks = [
        {"type": "EMAHook", "ema_type": "ExpMomentumEMA", "momentum": 0.02, "update_buffers": True, "priority": 49},
        {"type": "PipelineSwitchHook", "switch_epoch": 2, "switch_pipeline": STAGE2},
        {"type": "RecordHook", "path": str(record)},
    ]
    overrides = {
        **parity_overrides(record),
        "data_root": f"{shapes}/",
        "train_dataloader.dataset.pipeline": STAGE1,
        "custom_hooks": hooks,
        "load_from": str(start),
    }
    return {"global_batch_size": 8, "config_file": "configs/shapes_rtmdet.py", "override_mmdet_config": overrides}


def yolox_hparams(shapes: Path, record: Path, start: Path) -> dict:
    # YOLOXModeSwitchHook drops the pipeline steps named in skip_type_keys: here the Resize to 96.
    hooks = [
        {"type": "YOLOXModeSwitchHook", "num_last_epochs": 2, "skip_type_keys": ["Resize"], "priority": 48},
        {"type": "SyncNormHook", "priority": 48},
        {"type": "EMAHook", "ema_type": "ExpMomentumEMA", "momentum": 0.02, "update_buffers": True, "priority": 49},
        {"type": "RecordHook", "path": str(record)},
    ]
    overrides = {
        **parity_overrides(record),
        "data_root": f"{shapes}/",
        "train_dataloader.dataset.pipeline": [STAGE2[2], {"type": "PackDetInputs"}],
        "custom_hooks": hooks,
        "load_from": str(start),
    }
    return {"global_batch_size": 8, "config_file": "configs/shapes_yolox.py", "override_mmdet_config": overrides}


RUNNER = """
import sys
from mmengine.config import Config
from mmengine.runner import Runner
cfg = Config.fromfile(sys.argv[1])
cfg.work_dir = sys.argv[2]
Runner.from_cfg(cfg).train()
"""


def start_weights(config: str, path: Path) -> Path:
    """One random initialisation, the starting point of both trainers."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    torch.manual_seed(1)
    model = MODELS.build(Config.fromfile(str(ROOT / "model_def" / config)).model)
    model.init_weights()
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def records(path: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [x for x in lines if "losses" in x], [x for x in lines if "validation_at" in x]


def run_runner(config: Path, work_dir: Path, **env: str) -> subprocess.CompletedProcess:
    runner = subprocess.run(
        [sys.executable, "-c", RUNNER, str(config), str(work_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **ENV, **env},
    )
    assert runner.returncode == 0, runner.stderr[-3000:]
    return runner


def run_both(tmp: Path, name: str, hparams_for, shapes: Path, config: str) -> dict:
    """det-mmdet and the Runner on one resolved config; their records, outputs and final weights."""
    start = start_weights(config, tmp / "start.pth")
    ours_rec, runner_rec = tmp / f"{name}-ours.jsonl", tmp / f"{name}-runner.jsonl"
    exp = write_experiment(tmp, hparams_for(shapes, ours_rec, start), name=f"{name}.yaml")
    r = det_mmdet("train", exp, "--print-config", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    resolved = tmp / f"{name}-runner.py"
    resolved.write_text(r.stdout.replace(str(ours_rec), str(runner_rec)))

    out = tmp / f"{name}-ours"
    ours = det_mmdet("train", exp, "--output-dir", out, "--report-period", 1, env=ENV)
    assert ours.returncode == 0, ours.stderr[-3000:]
    run_runner(resolved, tmp / f"{name}-work")
    # The Runner's own checkpoint of its last epoch, written by this test: a full pickle by design.
    last = torch.load(tmp / f"{name}-work" / "epoch_4.pth", map_location="cpu", weights_only=False)
    mine = torch.load(newest_checkpoint(out / "checkpoints") / "model.pth", weights_only=True)
    return {"ours": records(ours_rec), "runner": records(runner_rec), "out": out, "exp": exp, "log": ours,
            "runner_ckpt": last, "ours_ckpt": mine, "ours_rec": ours_rec}  # fmt: skip


def assert_same_training(a: list[dict], b: list[dict], rtol: float = 1e-4) -> None:
    assert [x["iter"] for x in a] == [x["iter"] for x in b]
    for x, y in zip(a, b, strict=True):
        where = f"iter {x['iter']}"
        assert (x["epoch"], x["batch_idx"], x["hub"], x["shapes"]) == (
            y["epoch"],
            y["batch_idx"],
            y["hub"],
            y["shapes"],
        ), where
        assert x["losses"].keys() == y["losses"].keys(), where
        for k in x["losses"]:
            assert x["losses"][k] == pytest.approx(y["losses"][k], rel=rtol, abs=1e-6), f"{where} {k}"
        assert x["weights_sum"] == pytest.approx(y["weights_sum"], rel=1e-6), where


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-4), k


def validations(recs: list[dict]) -> list[tuple[int, int, float]]:
    """(batches, epoch, bbox_mAP) of each validation; the Runner's evaluator prefixes its metrics with coco/."""
    maps = [v["metrics"].get("bbox_mAP", v["metrics"].get("coco/bbox_mAP")) for v in recs]
    return [(v["validation_at"], v["epoch"], round(m, 6)) for v, m in zip(recs, maps, strict=True)]


@pytest.fixture(scope="module")
def rtmdet(tmp_path_factory, shapes):
    return run_both(tmp_path_factory.mktemp("rtmdet"), "rtmdet", rtmdet_hparams, shapes, "configs/shapes_rtmdet.py")


def test_rtmdet_trains_as_under_the_runner(rtmdet):
    (ours, ours_val), (ref, ref_val) = rtmdet["ours"], rtmdet["runner"]
    assert len(ours) == 4 * EPOCH
    assert_same_training(ours, ref)
    # PipelineSwitchHook at epoch 2 reached the two persistent workers: 128-px images, then 96-px.
    assert {tuple(s) for x in ours[: 2 * EPOCH] for s in x["shapes"]} == {(3, 128, 128)}
    assert {tuple(s) for x in ours[2 * EPOCH :] for s in x["shapes"]} == {(3, 96, 96)}
    # The MessageHub as RuntimeInfoHook keeps it, read by the hooks before each batch.
    assert [x["hub"]["iter"] for x in ours] == list(range(4 * EPOCH))
    assert [x["hub"]["epoch"] for x in ours] == [i // EPOCH for i in range(4 * EPOCH)]
    assert {x["hub"]["max_epochs"] for x in ours} == {4} and {x["hub"]["max_iters"] for x in ours} == {24}
    # val_interval 2, dynamic_intervals [(4, 1)]: after epochs 2, 3 (mmengine looks one epoch ahead) and 4.
    assert validations(ours_val) == validations(ref_val)
    assert [v["validation_at"] for v in ours_val] == [12, 18, 24]
    assert [x["batches"] for x in read_metrics(rtmdet["out"]) if x["group"] == "validation"] == [12, 18, 24]


def test_rtmdet_ema_weights_are_the_runners_and_in_model_pth(rtmdet, tmp_path):
    ours, ref = rtmdet["ours_ckpt"], rtmdet["runner_ckpt"]
    assert_same_weights(ours["state_dict"], ref["state_dict"])  # the averaged weights, as mmengine saves them
    assert_same_weights(ours["ema_state_dict"], ref["ema_state_dict"])  # the trained ones, prefixed module.
    assert int(ours["ema_state_dict"]["steps"]) == 4 * EPOCH
    trained = {k[len("module.") :]: v for k, v in ours["ema_state_dict"].items() if k.startswith("module.")}
    assert any(not torch.equal(trained[k], ours["state_dict"][k]) for k in trained)

    r = det_mmdet("export", rtmdet["out"], "--out", tmp_path / "model", env=ENV)  # the config imports RecordHook
    assert r.returncode == 0, r.stderr[-3000:]
    assert "EMA weights (EMAHook, 24 updates)" in r.stderr
    from mmdet.apis import DetInferencer

    exported = torch.load(tmp_path / "model" / "model.pth", weights_only=True)
    assert_same_weights(exported["state_dict"], ref["state_dict"])
    model_dir = tmp_path / "model"
    inferencer = DetInferencer(
        model=str(model_dir / "config.py"), weights=str(model_dir / "model.pth"), device="cpu", show_progress=False
    )
    for k, v in inferencer.model.state_dict().items():
        assert torch.equal(v, exported["state_dict"][k]), k


def test_rtmdet_resume_across_the_switch_continues_exactly(rtmdet, tmp_path, shapes):
    record = tmp_path / "resumed.jsonl"
    exp = write_experiment(tmp_path, rtmdet_hparams(shapes, record, rtmdet["exp"].parent / "start.pth"))
    out = tmp_path / "run"
    first = det_mmdet("train", exp, "--output-dir", out, "--max-epochs", 2, env=ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    record.unlink()
    second = det_mmdet("train", exp, "--output-dir", out, "--resume", env=ENV)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from batch 12" in second.stderr
    resumed, _ = records(record)
    continuous = rtmdet["ours"][0][2 * EPOCH :]
    assert_same_training(resumed, continuous, rtol=1e-6)  # a fresh process and fresh workers, switched
    final = torch.load(newest_checkpoint(out / "checkpoints") / "model.pth", weights_only=True)
    assert_same_weights(final["state_dict"], rtmdet["ours_ckpt"]["state_dict"], atol=1e-6)
    assert_same_weights(final["ema_state_dict"], rtmdet["ours_ckpt"]["ema_state_dict"], atol=1e-6)


def test_yolox_trains_as_under_the_runner(tmp_path, shapes):
    both = run_both(tmp_path, "yolox", yolox_hparams, shapes, "configs/shapes_yolox.py")
    (ours, ours_val), (ref, ref_val) = both["ours"], both["runner"]
    assert_same_training(ours, ref)
    # YOLOXModeSwitchHook: (epoch + 1) >= 4 - 2 from epoch 1 on: the Resize to 96 is skipped in the workers.
    assert {tuple(s) for x in ours[:EPOCH] for s in x["shapes"]} == {(3, 96, 96)}
    assert {tuple(s) for x in ours[EPOCH:] for s in x["shapes"]} == {(3, 128, 128)}
    # ... and its L1 loss term appears at the switch, in both trainers.
    assert "loss_l1" not in ours[EPOCH - 1]["losses"] and "loss_l1" in ours[EPOCH]["losses"]
    assert validations(ours_val) == validations(ref_val)
    assert_same_weights(both["ours_ckpt"]["state_dict"], both["runner_ckpt"]["state_dict"])


def test_rtmdet_on_two_slots_runs_the_hooks_on_every_rank(rtmdet, tmp_path, shapes):
    """Two processes (gloo): SyncBN becomes BN with a warning (torch's SyncBN needs GPUs), the
    MessageHub and the pipeline switch are the same on both ranks."""
    record = tmp_path / "two.jsonl"
    exp = write_experiment(tmp_path, rtmdet_hparams(shapes, record, rtmdet["exp"].parent / "start.pth"))
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "run", "--slots", 2, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SyncBatchNorm runs on GPUs only: on CPU each of the 2 processes normalises" in r.stderr
    train, _ = records(record)
    for rank in (0, 1):  # 4 images per slot and batch: each slot has an epoch of 6 batches, as with one slot
        mine = sorted((x for x in train if x["rank"] == rank), key=lambda x: x["iter"])
        assert [x["hub"]["iter"] for x in mine] == list(range(4 * EPOCH))
        assert [x["hub"]["epoch"] for x in mine] == [i // EPOCH for i in range(4 * EPOCH)]
        assert {len(x["shapes"]) for x in mine} == {4}
        assert [x["shapes"][0][-1] for x in mine] == [128] * (2 * EPOCH) + [96] * (2 * EPOCH)


def test_a_runner_checkpoint_is_read_weights_only_and_loads_as_load_from(rtmdet, tmp_path, shapes):
    """epoch_4.pth as mmengine's Runner wrote it (MessageHub, numpy values, EMA): no full unpickling."""
    from det_mmdet import weights

    path = rtmdet["exp"].parent / "rtmdet-work" / "epoch_4.pth"
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, map_location="cpu")  # torch's own default refuses it
    state = weights.read_state_dict(path, str(path))
    assert state.keys() == rtmdet["runner_ckpt"]["state_dict"].keys()  # the EMA weights, as mmengine loads
    assert all(torch.equal(state[k], v) for k, v in rtmdet["runner_ckpt"]["state_dict"].items())
    hparams = {**shapes_hparams(shapes, "configs/shapes_rtmdet.py"), "global_batch_size": 8, "load_from": str(path)}
    r = det_mmdet("train", write_experiment(tmp_path, hparams), "--output-dir", tmp_path / "o", "--max-batches", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"loaded {len(state)} tensors from {path}" in r.stderr


# mmengine 0.10's Runner reads its own checkpoints (HistoryBuffer, numpy) with a plain torch.load, which torch's
# weights-only default refuses: the reference is run with torch's own switch, for the files this test wrote.
RUNNER_OWN_FILES = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


def resumed_experiment(tmp: Path, shapes: Path, record: Path, start: Path, checkpoint: Path) -> Path:
    hparams = rtmdet_hparams(shapes, record, start)
    hparams["override_mmdet_config"].update({"load_from": str(checkpoint), "resume": True})
    return write_experiment(tmp, hparams, name="resumed.yaml")


def runner_config(exp: Path, ours: Path, theirs: Path, path: Path) -> Path:
    r = det_mmdet("train", exp, "--print-config", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    path.write_text(r.stdout.replace(str(ours), str(theirs)))
    return path


def test_a_runner_checkpoint_resumes_as_the_runner_resumes_it(rtmdet, tmp_path, shapes):
    """resume=True, load_from=epoch_2.pth (the Runner's, with EMA): det-mmdet and the Runner continue it alike."""
    saved = rtmdet["exp"].parent / "rtmdet-work" / "epoch_2.pth"
    ours_rec, runner_rec = tmp_path / "ours.jsonl", tmp_path / "runner.jsonl"
    exp = resumed_experiment(tmp_path, shapes, ours_rec, rtmdet["exp"].parent / "start.pth", saved)
    run_runner(runner_config(exp, ours_rec, runner_rec, tmp_path / "runner.py"), tmp_path / "work", **RUNNER_OWN_FILES)
    out = tmp_path / "ours"
    r = det_mmdet("train", exp, "--output-dir", out, "--report-period", 1, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resume=True: continues mmengine's Runner checkpoint {saved} at iteration {2 * EPOCH} (epoch 2)" in r.stderr
    (ours, ours_val), (ref, ref_val) = records(ours_rec), records(runner_rec)
    assert [x["iter"] for x in ours] == list(range(2 * EPOCH, 4 * EPOCH))  # batches 13..24 only (iter before +1)
    assert_same_training(ours, ref)
    assert_same_training(ours, rtmdet["runner"][0][2 * EPOCH :])  # and as the Runner's uninterrupted run
    assert validations(ours_val) == validations(ref_val)
    final = torch.load(newest_checkpoint(out / "checkpoints") / "model.pth", weights_only=True)
    theirs = torch.load(tmp_path / "work" / "epoch_4.pth", map_location="cpu", weights_only=False)
    assert_same_weights(final["state_dict"], theirs["state_dict"])
    assert_same_weights(final["ema_state_dict"], theirs["ema_state_dict"])


def test_export_mmengine_is_a_checkpoint_the_runner_resumes(rtmdet, tmp_path, shapes):
    """det-mmdet trains 2 epochs, exports --mmengine; the Runner continues it as det-mmdet itself would."""
    record = tmp_path / "first.jsonl"
    exp = write_experiment(tmp_path, rtmdet_hparams(shapes, record, rtmdet["exp"].parent / "start.pth"))
    out = tmp_path / "run"
    first = det_mmdet("train", exp, "--output-dir", out, "--max-epochs", 2, env=ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    exported = tmp_path / "epoch_2.pth"
    r = det_mmdet("export", out, "--mmengine", exported)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"mmengine's Runner checkpoint at iteration {2 * EPOCH}, epoch 2" in r.stderr
    torch.load(exported, map_location="cpu", weights_only=True)  # tensors and plain types only

    runner_rec = tmp_path / "runner.jsonl"
    resumed = resumed_experiment(tmp_path, shapes, record, rtmdet["exp"].parent / "start.pth", exported)
    run_runner(runner_config(resumed, record, runner_rec, tmp_path / "runner.py"), tmp_path / "work")  # weights-only
    ref, _ = records(runner_rec)
    assert [x["iter"] for x in ref] == list(range(2 * EPOCH, 4 * EPOCH))
    assert_same_training(ref, rtmdet["ours"][0][2 * EPOCH :])
    theirs = torch.load(tmp_path / "work" / "epoch_4.pth", map_location="cpu", weights_only=False)
    assert_same_weights(theirs["state_dict"], rtmdet["ours_ckpt"]["state_dict"])
    assert_same_weights(theirs["ema_state_dict"], rtmdet["ours_ckpt"]["ema_state_dict"])


def test_runner_checkpoints_export_predict_and_evaluate(rtmdet, tmp_path, shapes):
    """A Runner work_dir (its last_checkpoint) or epoch_N.pth works where a det-mmdet model directory does."""
    work = rtmdet["exp"].parent / "rtmdet-work"
    r = det_mmdet("export", work / "epoch_4.pth", "--out", tmp_path / "model", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    model = torch.load(tmp_path / "model" / "model.pth", weights_only=True)
    for k, v in rtmdet["runner_ckpt"]["state_dict"].items():  # the EMA weights, as the Runner's load_from reads
        assert torch.equal(model["state_dict"][k], v), k
    assert model["meta"]["dataset_meta"]["classes"] == list(rtmdet["runner_ckpt"]["meta"]["dataset_meta"]["classes"])
    scores = []
    for source in (work, tmp_path / "model"):
        out = tmp_path / f"eval-{source.name}"
        r = det_mmdet("evaluate", source, "--ann", shapes / "annotations" / "val.json", "--images", shapes / "val",
                      "--out", out, env=ENV)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        scores.append(json.loads((out / "metrics.json").read_text()))
    assert scores[0] == scores[1]
    image = sorted((shapes / "val").iterdir())[0]
    r = det_mmdet("predict", work / "epoch_4.pth", image, "--out", tmp_path / "pred", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "pred" / "results.json").is_file()

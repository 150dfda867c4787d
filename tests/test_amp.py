"""AmpOptimWrapper's keys as mmengine reads them (det_mmdet.amp), and the trial's order of wrapping on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, shapes_hparams, write_experiment
from det_mmdet import amp
from det_mmdet.errors import UserError

CUDA = torch.device("cuda")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on a CUDA GPU")


def test_plain_wrapper_has_no_autocast_and_no_scaler():
    autocast, scaler = amp.settings({"type": "OptimWrapper"}, torch.device("cpu"))
    assert scaler is None and not isinstance(autocast, torch.autocast)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"type": "ApexOptimWrapper"}, "optim_wrapper.type 'ApexOptimWrapper': choose OptimWrapper or AmpOptimWrapper"),
        ({"type": "AmpOptimWrapper", "dtype": "float8"}, "optim_wrapper.dtype 'float8': choose float16 or bfloat16"),
        (
            {"type": "AmpOptimWrapper", "loss_scale": "static"},
            "optim_wrapper.loss_scale 'static': choose 'dynamic', a positive number (a fixed scale) "
            "or a dict of torch.amp.GradScaler arguments",
        ),
        ({"type": "AmpOptimWrapper", "loss_scale": -1.0}, "optim_wrapper.loss_scale -1.0: choose"),
        ({"type": "AmpOptimWrapper", "loss_scale": {"scale": 8}}, "optim_wrapper.loss_scale {'scale': 8}: not"),
        ({"type": "AmpOptimWrapper", "dtype": "bfloat16", "loss_scale": "x"}, "optim_wrapper.loss_scale 'x': choose"),
    ],
)
def test_bad_amp_keys_are_refused_on_every_device(cfg, message):
    """A CPU run refuses what a GPU run would, so a laptop check catches a cluster failure."""
    with pytest.raises(UserError) as err:
        amp.settings(cfg, torch.device("cpu"))
    assert str(err.value).startswith(message)


def test_amp_on_cpu_trains_in_float32_with_a_warning(caplog):
    autocast, scaler = amp.settings({"type": "AmpOptimWrapper", "loss_scale": 512.0}, torch.device("cpu"))
    assert scaler is None and not isinstance(autocast, torch.autocast)
    assert "optim_wrapper.type AmpOptimWrapper: no GPU here, training in float32" in caplog.text


@needs_gpu
@pytest.mark.parametrize(
    ("loss_scale", "kind", "start"),
    [
        ("dynamic", torch.amp.GradScaler, 2.0**16),
        (512.0, amp.FixedLossScale, 512.0),
        ({"init_scale": 64.0}, None, 64.0),
    ],
)
def test_loss_scale_means_what_it_means_in_mmengine(loss_scale, kind, start):
    """'dynamic' halves on an overflow; a number stays fixed (mmengine passes it to every update); a dict is
    GradScaler's arguments. The step with an infinite gradient is skipped in every case."""
    autocast, scaler = amp.settings({"type": "AmpOptimWrapper", "loss_scale": loss_scale}, CUDA)
    assert isinstance(autocast, torch.autocast) and autocast.fast_dtype == torch.float16
    assert scaler.get_scale() == start and (kind is None or type(scaler) is kind)
    weight = torch.nn.Parameter(torch.ones(1, device=CUDA))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler.scale(weight.sum() * float("inf")).backward()
    scaler.step(optimizer)
    scaler.update()
    assert weight.item() == 1.0  # skipped
    assert scaler.get_scale() == (512.0 if kind is amp.FixedLossScale else start / 2)


@needs_gpu
def test_bfloat16_needs_no_scaler():
    autocast, scaler = amp.settings({"type": "AmpOptimWrapper", "dtype": "bfloat16"}, CUDA)
    assert scaler is None and autocast.fast_dtype == torch.bfloat16


@needs_gpu
def test_trial_trains_rtmdet_with_amp_on_a_gpu(tmp_path):
    """The trial hands Determined its scaler before the model (Determined refuses it after) and float16 steps
    run. RTMDet trains with no mmcv CUDA op; the run stops after its training steps (bench/gpu_loader.py's run
    mode), so no validation needs one either."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_loader
    from pipeline import make_coco

    make_coco(tmp_path / "data", 8)
    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps(gpu_loader.experiment(tmp_path / "data", True)))
    result = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_loader.py"), "--run", "--run-amp", "--experiment", str(exp)]
    cmd += ["--result", str(result), "--output-dir", str(tmp_path / "out"), "--num-workers", "2"]
    cmd += ["--warmup", "1", "--batches", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(json.loads(result.read_text())["steps"]) == 3


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trial_hands_its_scaler_to_determined_and_updates_it_after_each_optimizer_step(
    tmp_path, shapes, monkeypatch, accumulate
):
    """With a scaler (on a GPU: float16 AmpOptimWrapper), the trial wraps it before the model, as Determined
    requires, and updates it once after every optimizer step: Determined steps through it but leaves the
    update to the trial, and skips the step between gradient-aggregation boundaries. Training steps run under
    the training autocast, validation does not (the Runner's ValLoop doesn't either). Here torch's CPU
    GradScaler (a real, enabled one) takes the place of amp.settings' CUDA scaler."""
    from det_mmdet.cli import main

    calls: list[str] = []

    class RecordingScaler(torch.amp.GradScaler):
        def step(self, optimizer, *args, **kwargs):
            calls.append("step")
            return super().step(optimizer, *args, **kwargs)

        def update(self, new_scale=None):
            calls.append("update")
            super().update(new_scale)

    class Autocast:  # amp.settings' autocast, recorded
        def __enter__(self):
            calls.append("autocast")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(amp, "settings", lambda cfg, device: (Autocast(), RecordingScaler("cpu")))
    exp = write_experiment(tmp_path, shapes_hparams(shapes))
    argv = ["train", str(exp), "--max-batches", "4", "--output-dir", str(tmp_path / "out")]
    argv += ["--set", f"optim_wrapper.accumulative_counts={accumulate}"]
    assert main(argv) == 0  # 4 training steps, then a validation of the 16 images
    per_step = ["autocast"] * accumulate + ["step", "update"]
    assert calls == per_step * (4 // accumulate)


def test_validation_runs_in_float32_unless_val_cfg_fp16(caplog):
    """The Runner's ValLoop autocasts only with fp16=True, whatever the optimizer wrapper trains in."""
    for val_cfg in ({}, {"type": "ValLoop"}, {"type": "ValLoop", "fp16": False}):
        assert not isinstance(amp.validation(val_cfg, CUDA), torch.autocast)
    assert not isinstance(amp.validation({"fp16": True}, torch.device("cpu")), torch.autocast)
    assert "val_cfg.fp16: no GPU here, validating in float32" in caplog.text


@needs_gpu
def test_val_cfg_fp16_autocasts_validation_in_float16_on_a_gpu():
    autocast = amp.validation({"type": "ValLoop", "fp16": True}, CUDA)
    assert isinstance(autocast, torch.autocast) and autocast.fast_dtype == torch.float16

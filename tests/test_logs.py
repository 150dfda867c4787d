"""What a run prints: a start-up summary, one line per report, the COCO table once; no library chatter."""

from __future__ import annotations

import contextlib
import io

from conftest import det_mmdet, read_metrics, shapes_hparams, write_experiment

NOISE = (
    "loading annotations into memory",  # pycocotools, at every annotation file and validation
    "index created!",
    "DONE (t=",
    "Evaluating bbox...",  # mmengine INFO from CocoMetric
    "Evaluate annotation type *bbox*",  # faster-coco-eval, at every validation
    "COCOeval_opt.accumulate() finished",
    "paramwise_options --",  # mmengine INFO per parameter with a paramwise rule
    "Initialized by",  # mmengine INFO per initialised parameter
    "It is skipped since bypass_duplicate=True",  # mmengine WARNING for modules two heads share (RTMDet)
    "torch.cuda.amp.autocast(args...)` is deprecated",  # FutureWarning from mmdet's own layers
    "torch.meshgrid: in an upcoming release",
)
TABLE_LINE = "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"


def run(tmp_path, shapes, *args, config="configs/shapes_faster_rcnn.py", **overrides):
    exp = write_experiment(tmp_path, shapes_hparams(shapes, config, **overrides))
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "run", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def test_a_run_says_what_it_does_and_nothing_else(tmp_path, shapes):
    # AmpOptimWrapper on a CPU: a real warning of ours, which must come through.
    out = run(
        tmp_path, shapes, "--max-batches", 4, "--validation-period", 2, **{"optim_wrapper.type": "AmpOptimWrapper"}
    )
    for noise in NOISE:
        assert noise not in out, noise
    for line in (
        "model: FasterRCNN, 0.86 M parameters; classes: circle, square, triangle",
        "data: 48 training / 16 validation images; 1 slot(s) x 4 images per batch, 12 batches per epoch",
        "length: 4 batches (1 epoch), validation every 2 batches",
        "[validation @ batch 2] bbox_mAP=",
        "[validation @ batch 4] bbox_mAP=",
        "optim_wrapper.type AmpOptimWrapper: no GPU here, training in float32",
        "validation: CocoMetric bbox scored by hotcoco (data.coco_backend)",
    ):
        assert line in out, line
    assert out.count(TABLE_LINE) == 1  # two validations, the table of the last one at the end
    assert out.index(TABLE_LINE) > out.index("[validation @ batch 4]")
    assert out.count("AP per class:\n| class | bbox AP |") == 1  # ... and its AP per class
    assert out.index("| triangle | ") > out.index(TABLE_LINE)
    (last,) = [r for r in read_metrics(tmp_path / "run") if r["group"] == "validation" and r["batches"] == 4]
    assert {"bbox_AP_circle", "bbox_AP_square", "bbox_AP_triangle"} <= set(last["metrics"])  # plottable per class


def test_rtmdet_keeps_its_hooks_lines_and_drops_the_known_noise(tmp_path, shapes):
    out = run(
        tmp_path, shapes, "--max-batches", 14, config="configs/shapes_rtmdet.py",
        **{"custom_hooks.1.switch_epoch": 1},
    )  # fmt: skip
    for noise in NOISE:
        assert noise not in out, noise
    assert "Switch pipeline now!" in out  # what a hook says is the user's business
    assert "hooks: RuntimeInfoHook, EMAHook, PipelineSwitchHook" in out


def test_verbose_brings_the_library_output_back(tmp_path, shapes):
    out = run(tmp_path, shapes, "--max-batches", 2, "--verbose")
    # pycocotools' own lines as mmdet's CocoMetric reads the annotation file (hotcoco scores without a word)
    assert "loading annotations into memory" in out and "index created!" in out


def test_a_cluster_log_gets_one_plain_line_per_report_and_validation():
    """On a cluster there is no terminal and no local metrics file: the chief logs each report."""
    import logging
    from types import SimpleNamespace

    from det_mmdet.trial import ClusterReportLines

    runner = SimpleNamespace(iter=250, max_iters=1000)
    callback = ClusterReportLines(SimpleNamespace(hooks=SimpleNamespace(runner=runner)))
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("det_mmdet")
    log.addHandler(handler)
    level, log.level = log.level, logging.INFO
    try:
        callback.on_training_workload_end({"loss": 1.23456, "lr": 0.02, "loss_cls": 0.5}, [])
        runner.iter = 1000
        callback.on_validation_end({"bbox_mAP": 0.4321, "val_images": 50.0, "bbox_mAP_50": 0.6})
    finally:
        log.removeHandler(handler)
        log.level = level
    assert seen == [
        "[training @ batch 250/1000, 25%] loss=1.235 lr=0.02",
        "[validation @ batch 1000/1000, 100%] bbox_mAP=0.4321",
    ]


INFERENCER_NOISE = (
    "Loads checkpoint by local backend from path",  # mmengine's checkpoint loader, INFO
    'Failed to search registry with scope "mmdet" in the "function" registry tree',  # the registry, WARNING
    "please provide the `save_dir` argument",  # the Visualizer's LocalVisBackend, UserWarning
)


def test_predict_and_evaluate_keep_the_inferencers_chatter_unless_verbose(tmp_path, shapes):
    """mmdet's DetInferencer (demo pictures, predict, evaluate; one helper builds it) says these every time."""
    run(tmp_path, shapes, "--max-batches", 1)
    model, val = tmp_path / "run", shapes / "val"
    quiet = det_mmdet("predict", model, val / "val_00000.jpg", "--out", tmp_path / "pred")
    loud = det_mmdet("evaluate", model, "--ann", shapes / "annotations" / "val.json", "--images", val, "--verbose")
    for r in (quiet, loud):
        assert r.returncode == 0, r.stderr[-3000:]
    for noise in INFERENCER_NOISE:
        assert noise not in quiet.stdout + quiet.stderr, noise
        assert noise in loud.stdout + loud.stderr, noise
    assert " on 1 images -> " in quiet.stderr  # our own line stays


def test_each_cli_call_logs_to_the_stderr_of_its_time(capsys):
    """A second det-mmdet call in one process (a notebook, a test) prints where stderr is then, not where it
    was at the first call."""
    from det_mmdet.cli import logger, setup_logging

    first = io.StringIO()
    with contextlib.redirect_stderr(first):
        setup_logging()
        logger.info("first call")
    setup_logging()
    logger.info("second call")
    assert first.getvalue() == "first call\n"
    assert capsys.readouterr().err == "second call\n"

"""The model zoo on a CPU: mmdet's own configs under ``det-mmdet train`` and under mmengine's Runner.

For each family below, mmdet's config is loaded and shrunk only in what a CPU needs: every image size
in the pipelines and batch augments scaled by one factor, so the test-time size is ``--size`` px, 2 images per
batch, 4 validation images, no loader workers. The datasets point at a drawn-shapes set (``make_shapes``)
with its 3 classes set everywhere the model counts classes. ImageNet ``init_cfg`` checkpoints are
dropped: both trainers start from one random initialisation made here and given as ``load_from``
(nothing is downloaded). The shrunk config is written once and both trainers train it for ``--batches``
batches, then validate:

- det-mmdet: ``det-mmdet train EXP --max-batches N --validation-period N`` (Determined's local mode);
- mmengine Runner: ``Runner.from_cfg(cfg).train()`` as mmdet's ``tools/train.py`` does, with
  ``IterBasedTrainLoop(max_iters=N, val_interval=N)``.

Prints a markdown table: each trainer's outcome (or its last error line), the loss after N batches,
bbox_mAP and wall time. The losses differ where a pipeline draws random augmentations (each trainer
draws its own); ``tests/test_hooks.py`` is where equality is checked.

    .venv/bin/python bench/zoo.py [--only retinanet,dino] [--batches 2] [--trainers ours,runner] [--size 192]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from throughput import initial_weights  # noqa: E402  (the sibling bench script)

DET_MMDET = Path(sys.executable).parent / "det-mmdet"

# family -> mmdet config (mmdet 3.3.0's names), in the order of the table.
FAMILIES = {
    "Faster R-CNN": "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
    "Mask R-CNN": "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py",
    "Cascade R-CNN": "cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py",
    "RetinaNet": "retinanet/retinanet_r50_fpn_1x_coco.py",
    "FCOS": "fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py",
    "ATSS": "atss/atss_r50_fpn_1x_coco.py",
    "TOOD": "tood/tood_r50_fpn_1x_coco.py",
    "GFL": "gfl/gfl_r50_fpn_1x_coco.py",
    "RTMDet": "rtmdet/rtmdet_tiny_8xb32-300e_coco.py",
    "RTMDet-Ins": "rtmdet/rtmdet-ins_tiny_8xb32-300e_coco.py",
    "YOLOX": "yolox/yolox_tiny_8xb8-300e_coco.py",
    "YOLOv3": "yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py",
    "SSDLite": "ssd/ssdlite_mobilenetv2-scratch_8xb24-600e_coco.py",
    "DETR": "detr/detr_r50_8xb2-150e_coco.py",
    "Deformable DETR": "deformable_detr/deformable-detr_r50_16xb2-50e_coco.py",
    "DINO": "dino/dino-4scale_r50_8xb2-12e_coco.py",  # 900 queries: needs >= 900 encoder tokens (see SIZES)
    "SOLOv2": "solov2/solov2_r50_fpn_1x_coco.py",
    "YOLACT": "yolact/yolact_r50_1xb8-55e_coco.py",
    "Mask2Former": "mask2former/mask2former_r50_8xb2-lsj-50e_coco.py",
    "BoxInst": "boxinst/boxinst_r50_fpn_ms-90k_coco.py",
    "Soft Teacher": "soft_teacher/soft-teacher_faster-rcnn_r50-caffe_fpn_180k_semi-0.1-coco.py",
}
# Families that need larger images than --size: DINO selects 900 queries from its encoder's tokens.
SIZES = {"DINO": 480}
SIZE_KEYS = ("scale", "img_scale", "crop_size", "size", "scales", "random_size_range", "border")

RUNNER = """
import sys
from mmengine.config import Config
from mmengine.runner import Runner
cfg = Config.fromfile(sys.argv[1])
n = int(sys.argv[3])
cfg.work_dir = sys.argv[2]
cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=n, val_interval=n)
cfg.default_hooks.logger.interval = 1
cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=10**9)
cfg.log_processor.by_epoch = False
Runner.from_cfg(cfg).train()
"""


# ---- shrinking a config ------------------------------------------------------------------------------


def _is_size(value: Any) -> bool:
    pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)
    many = isinstance(value, (list, tuple)) and value and all(_is_size(v) for v in value)
    return pair or bool(many) or (isinstance(value, int) and not isinstance(value, bool))


def _sizes(node: Any) -> list[int]:
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            found += [abs(v) for v in _flat(value)] if key in SIZE_KEYS and _is_size(value) else _sizes(value)
        return found
    if isinstance(node, (list, tuple)):
        return [s for v in node for s in _sizes(v)]
    return []


def _flat(value: Any) -> list[int]:
    return [value] if isinstance(value, int) else [i for v in value for i in _flat(v)]


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, int):
        size = max(16, round(abs(value) * factor / 16) * 16)
        return size if value >= 0 else -size
    return type(value)(_scaled(v, factor) for v in value)


def _scale_sizes(node: Any, factor: float) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SIZE_KEYS and _is_size(value):
                node[key] = _scaled(value, factor)
            else:
                _scale_sizes(value, factor)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _scale_sizes(value, factor)


def _datasets(node: Any) -> list[dict]:
    """Every dataset config under ``node`` (one with an ``ann_file`` and a ``pipeline``)."""
    if isinstance(node, dict):
        own = [node] if "ann_file" in node and "pipeline" in node else []
        return own + [d for v in node.values() for d in _datasets(v)]
    if isinstance(node, (list, tuple)):
        return [d for v in node for d in _datasets(v)]
    return []


def _drop_pretrained(node: Any) -> None:
    if isinstance(node, dict):
        init = node.get("init_cfg")
        inits = init if isinstance(init, (list, tuple)) else [init]
        if any(isinstance(i, dict) and i.get("type") == "Pretrained" for i in inits):
            kept = [i for i in inits if not (isinstance(i, dict) and i.get("type") == "Pretrained")]
            node["init_cfg"] = kept or None
        for value in node.values():
            _drop_pretrained(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _drop_pretrained(value)


def shrink(config: str, data: Path, size: int, val_images: int = 4) -> dict[str, Any]:
    """mmdet's ``config`` as a plain dict, for a CPU and the drawn-shapes set at ``data``."""
    from mmengine.config import Config

    from det_mmdet.config import locate, set_classes

    tree = Config.fromfile(str(locate(config, "config_file", [], packaged=True))).to_dict()
    names = [c["name"] for c in json.loads((data / "annotations" / "train.json").read_text())["categories"]]
    # The test-time size is the reference (DETR's training scales reach 4200 px for its crop branch).
    largest = max(_sizes(tree.get("val_dataloader")) or _sizes(tree.get("train_dataloader")) or [size])
    for node in (tree.get("train_dataloader"), tree.get("val_dataloader"), tree.get("test_dataloader")):
        _scale_sizes(node, size / largest)
    _scale_sizes((tree.get("model") or {}).get("data_preprocessor"), size / largest)  # batch augments
    for split, loader in (("train", "train_dataloader"), ("val", "val_dataloader"), ("val", "test_dataloader")):
        for dataset in _datasets(tree.get(loader)):
            dataset.update(data_root=f"{data}/", ann_file=f"annotations/{split}.json", data_prefix={"img": f"{split}/"})
            if split == "val":
                dataset["indices"] = val_images
        if tree.get(loader):
            tree[loader].update(num_workers=0, persistent_workers=False, batch_size=2 if split == "train" else 1)
    for key in ("val_evaluator", "test_evaluator"):
        for evaluator in tree[key] if isinstance(tree.get(key), list) else [tree.get(key) or {}]:
            if "ann_file" in evaluator:
                evaluator["ann_file"] = f"{data}/annotations/val.json"
    sampler = (tree.get("train_dataloader") or {}).get("sampler") or {}
    if "shuffle" in sampler:
        sampler["shuffle"] = False
    set_classes(tree, names)
    _drop_pretrained(tree.get("model"))
    tree["randomness"] = {"seed": 0}
    return tree


# ---- running both trainers ----------------------------------------------------------------------------


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip()[:160] if lines else "(no output)"


def searcher_metric(config_file: Path) -> str:
    """bbox_mAP, or segm_mAP for models evaluated on masks only (SOLOv2)."""
    from mmengine.config import Config

    evaluator = Config.fromfile(str(config_file)).get("val_evaluator") or {}
    first = evaluator[0] if isinstance(evaluator, list) else evaluator
    kinds = first.get("metric", "bbox")
    return "bbox_mAP" if "bbox" in ([kinds] if isinstance(kinds, str) else list(kinds)) else "segm_mAP"


def run_ours(config_file: Path, init: Path, work: Path, batches: int) -> dict[str, Any]:
    import yaml

    exp = work / "exp.yaml"
    hparams = {"global_batch_size": 2, "config_file": str(config_file), "load_from": str(init)}
    searcher = {"name": "single", "metric": searcher_metric(config_file), "smaller_is_better": False}
    exp.write_text(yaml.safe_dump({"name": "zoo", "hyperparameters": hparams, "searcher": searcher}))
    out = work / "ours"
    args = ["train", exp, "--output-dir", out, "--max-batches", batches, "--validation-period", batches]
    start = time.perf_counter()
    proc = subprocess.run([str(DET_MMDET), *map(str, args), "--report-period", "1"], capture_output=True, text=True)
    result: dict[str, Any] = {"s": time.perf_counter() - start, "rc": proc.returncode, "last": last_line(proc.stderr)}
    metrics = out / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    losses = [r["metrics"].get("loss") for r in records if r["group"] == "training"]
    maps = [r["metrics"].get("bbox_mAP") for r in records if r["group"] == "validation"]
    result["loss"] = losses[-1] if losses else None
    result["map"] = maps[-1] if maps else None
    return result


def run_runner(config_file: Path, init: Path, work: Path, batches: int) -> dict[str, Any]:
    from mmengine.config import Config

    cfg = Config.fromfile(str(config_file))
    cfg.load_from = str(init)
    runner_cfg = work / "runner_config.py"
    cfg.dump(str(runner_cfg))
    start = time.perf_counter()
    cmd = [sys.executable, "-c", RUNNER, str(runner_cfg), str(work / "runner"), str(batches)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result: dict[str, Any] = {"s": time.perf_counter() - start, "rc": proc.returncode, "last": last_line(proc.stderr)}
    scalars = sorted((work / "runner").glob("*/vis_data/scalars.json"))
    lines = [json.loads(x) for x in scalars[-1].read_text().splitlines()] if scalars else []
    losses = [x["loss"] for x in lines if "loss" in x]
    maps = [x["coco/bbox_mAP"] for x in lines if "coco/bbox_mAP" in x]
    result["loss"] = losses[-1] if losses else None
    result["map"] = maps[-1] if maps else None
    return result


def run_family(name: str, config: str, data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from mmengine.config import Config

    work.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"family": name, "config": config}
    config_file = work / "config.py"
    Config(shrink(config, data, max(args.size, SIZES.get(name, 0)))).dump(str(config_file))
    try:
        init = initial_weights(config_file, work / "init.pth")  # bench/throughput.py's: one shared start
    except Exception as e:  # noqa: BLE001  (a row of the table, not a crash of the bench: the trainers say why)
        init = work / "init.pth"
        row["init"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    for trainer in args.trainers:
        run = run_ours if trainer == "ours" else run_runner
        row[trainer] = run(config_file, init, work, args.batches) if init.is_file() or trainer == "ours" else None
        print(f"{name:16s} {trainer:6s} {_outcome(row[trainer])}", file=sys.stderr, flush=True)
    return row


def _outcome(result: dict[str, Any] | None) -> str:
    if result is None:
        return "not run"
    if result["rc"] == 0:
        return "trains + validates"
    return f"fails: `{result['last'].replace('|', '/')}`"


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}"


def table(rows: list[dict[str, Any]], trainers: list[str], batches: int) -> str:
    names = {"ours": "det-mmdet", "runner": "mmengine Runner"}
    head = ["family", "mmdet config"]
    for t in trainers:
        head += [names[t], f"loss @ {batches} ({names[t]})", f"bbox_mAP ({names[t]})", f"s ({names[t]})"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [row["family"], f"`{row['config']}`"]
        for t in trainers:
            r = row.get(t)
            cells += [_outcome(r), _number(r and r["loss"]), _number(r and r["map"]), _number(r and r["s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated family names or config stems (default: all)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--size", type=int, default=192, help="test-time image side, px (every size scales with it)")
    parser.add_argument("--trainers", default="ours,runner", help="ours, runner or both (comma-separated)")
    parser.add_argument("--work", type=Path, help="keep configs, weights and outputs here (default: a temp dir)")
    args = parser.parse_args()
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if not set(args.trainers) <= {"ours", "runner"}:
        parser.error(f"--trainers: choose from ours, runner (got {','.join(args.trainers)})")
    families = FAMILIES
    if args.only:
        wanted = {w.strip().lower() for w in args.only.split(",")}
        families = {k: v for k, v in FAMILIES.items() if k.lower() in wanted or Path(v).stem.lower() in wanted}
        if len(families) != len(wanted):
            parser.error(f"--only: unknown family in {args.only!r} (choose from {', '.join(FAMILIES)})")

    sys.path.insert(0, str(ROOT / "model_def"))
    from det_mmdet.shapes import make_shapes

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-zoo-"))
    data = make_shapes(work / "shapes", train=16, val=8, seed=0)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    started = time.time()
    rows = [run_family(name, cfg, data, work / name.replace(" ", "_"), args) for name, cfg in families.items()]
    print(
        f"`bench/zoo.py --batches {args.batches} --size {args.size}` ({time.strftime('%Y-%m-%d')}): "
        f"{len(rows)} families, {args.batches} batches of 2 at {args.size} px, 4 validation images; "
        f"{os.cpu_count()} CPU cores; {(time.time() - started) / 60:.1f} min.\n"
    )
    print(table(rows, args.trainers, args.batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())

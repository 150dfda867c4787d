"""Models out of training: export a checkpoint, predict on images, evaluate on a COCO set.

A *model directory* holds ``model.pth`` (``state_dict`` + ``meta.dataset_meta`` with the classes;
tensors and plain types only, so ``torch.load(weights_only=True)`` reads it) and ``config.py`` (the
resolved config in test mode). mmdet's ``DetInferencer`` and ``tools/test.py`` load it unchanged.
``export`` makes one from any checkpoint this project wrote, locally or on a cluster (after
``det checkpoint download``), and from a run directory (its newest complete checkpoint).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from det_mmdet import backends  # registers s3/gcs for URIs given as inputs
from det_mmdet.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    allow_numpy_rng_state,
    newest_checkpoint,
    plain,
    weights_kind,
)
from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ---- export ---------------------------------------------------------------------------------------


def runner_checkpoint(source: Path) -> Path | None:
    """A checkpoint mmengine's Runner wrote: the ``.pth`` itself, or the one a work_dir's ``last_checkpoint`` names."""
    if source.is_file() and source.suffix == ".pth":
        return source
    pointer = source / "last_checkpoint"
    if not pointer.is_file():
        return None
    named = Path(pointer.read_text().strip())
    for candidate in (named, source / named.name):  # the Runner writes the path it saved to
        if candidate.is_file():
            return candidate
    raise UserError(f"{pointer} names {named}, which does not exist")


def model_from_runner_checkpoint(path: Path, out: Path) -> dict[str, Any]:
    """``model.pth`` + ``config.py`` from a Runner checkpoint: its ``state_dict`` (EMA weights where the run had
    an EMAHook, what mmengine's ``load_from`` and ``tools/test.py`` load) and the config saved in ``meta.cfg``."""
    from mmengine.config import Config

    from det_mmdet import mmengine_checkpoints

    saved = mmengine_checkpoints.load(path, str(path))
    meta = saved.get("meta") if isinstance(saved.get("meta"), dict) else {}
    if not meta.get("cfg") or "state_dict" not in saved:
        raise UserError(f"{path}: not a checkpoint of mmengine's Runner (no meta.cfg / state_dict)")
    cfg = Config.fromstring(meta["cfg"], file_format=".py")
    test_mode_config(cfg)
    dataset_meta = {k: v for k, v in (meta.get("dataset_meta") or {}).items() if k in ("classes", "palette")}
    model = {
        "state_dict": {k.removeprefix("module."): v for k, v in saved["state_dict"].items()},
        "meta": {"dataset_meta": plain(dataset_meta), "epoch": meta.get("epoch"), "iter": meta.get("iter")},
    }
    if "ema_state_dict" in saved:
        model["ema_state_dict"] = saved["ema_state_dict"]
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model, out / MODEL_FILE)
    cfg.dump(str(out / CONFIG_FILE))
    return model


def model_files(source: Path, scratch: Path) -> Path:
    """A directory with ``config.py`` + ``model.pth`` for ``source``: a model directory, a det-mmdet
    checkpoint or run, or a Runner checkpoint / work_dir (exported into ``scratch`` first)."""
    runner_file = runner_checkpoint(source) if source.exists() else None
    if runner_file is not None:
        model_from_runner_checkpoint(runner_file, scratch)
        return scratch
    found = find_checkpoint(source)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (found / name).is_file():
            raise UserError(f"{found}: no {name} (make a model directory with `det-mmdet export`)")
    return found


def find_checkpoint(source: Path) -> Path:
    """``source`` itself when it is a checkpoint, else the newest complete one of a run directory."""
    if not source.exists():
        raise UserError(f"{source} does not exist")
    if (source / CONFIG_FILE).is_file() and ((source / MODEL_FILE).is_file() or (source / "state_dict.pth").is_file()):
        return source
    newest = newest_checkpoint(source / "checkpoints") or newest_checkpoint(source)
    if newest is None:
        raise UserError(f"{source}: neither a checkpoint (config.py + model.pth) nor a run with complete checkpoints")
    return newest


def test_mode_config(cfg) -> None:
    """What inference and ``tools/test.py`` need: test loader/evaluator present, nothing to download."""
    for split in ("dataloader", "evaluator", "cfg"):
        if not cfg.get(f"test_{split}") and cfg.get(f"val_{split}"):
            cfg[f"test_{split}"] = cfg[f"val_{split}"]
    cfg.load_from = None
    cfg.resume = False


def export(source: Path, out: Path) -> Path:
    from det_mmdet.config import load_config_file

    runner_file = runner_checkpoint(source) if source.exists() else None
    if runner_file is not None:
        saved = model_from_runner_checkpoint(runner_file, out)
        classes = saved["meta"]["dataset_meta"].get("classes") or []
        logger.info("exported %s (mmengine's Runner) -> %s (%d classes; %s)", runner_file, out, len(classes),
                    weights_kind(saved))  # fmt: skip
        return out
    ckpt = find_checkpoint(source)
    cfg = load_config_file(ckpt / CONFIG_FILE, "checkpoint config")
    test_mode_config(cfg)
    if (ckpt / MODEL_FILE).is_file():
        saved = torch.load(ckpt / MODEL_FILE, map_location="cpu", weights_only=True)
    else:  # Determined's own state: the first (only) model's state dict; classes from the config
        allow_numpy_rng_state()
        determined = torch.load(ckpt / "state_dict.pth", map_location="cpu", weights_only=True)
        state = determined["models_state_dict"][0]
        classes = ((cfg.get("train_dataloader") or {}).get("dataset") or {}).get("metainfo", {}).get("classes")
        saved = {"state_dict": state, "meta": {"dataset_meta": plain({"classes": classes} if classes else {})}}
        hooks = (determined.get("callbacks") or {}).get("mmdet_hooks")
        if hooks:  # what the hooks put in the checkpoint: EMA weights replace the trained ones, as in model.pth
            saved["state_dict"] = {**state, **hooks["replaced"]}
            saved.update(hooks["added"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(saved, out / MODEL_FILE)
    cfg.dump(str(out / CONFIG_FILE))
    classes = saved.get("meta", {}).get("dataset_meta", {}).get("classes") or []
    logger.info("exported %s -> %s (%d classes; %s)", ckpt, out, len(classes), weights_kind(saved))
    return out


def export_mmengine(source: Path, out: Path) -> Path:
    """A checkpoint mmengine's Runner resumes from (``resume=True, load_from=OUT``) from a det-mmdet checkpoint.

    The Runner's layout: ``meta`` (epoch, iter, seed, cfg, dataset_meta), ``state_dict`` as the hooks left it
    (EMA weights with EMAHook, the trained ones in ``ema_state_dict``), ``optimizer`` (with AmpOptimWrapper's
    ``loss_scaler``), ``param_schedulers`` in config order, and the MessageHub's iteration and epoch.
    Tensors and plain types only: torch's weights-only loader (the Runner's, by default) reads it.
    """
    import mmengine

    ckpt = find_checkpoint(source)
    if not (ckpt / "state_dict.pth").is_file():
        raise UserError(f"{ckpt}: --mmengine needs a training checkpoint (with state_dict.pth), not a model directory")
    allow_numpy_rng_state()
    determined = torch.load(ckpt / "state_dict.pth", map_location="cpu", weights_only=True)
    hooks = (determined.get("callbacks") or {}).get("mmdet_hooks")
    if not hooks:
        raise UserError(f"{ckpt}: no mmdet hooks' state: not a checkpoint of det-mmdet's MMDetTrial")
    state = {k.removeprefix("module."): v for k, v in determined["models_state_dict"][0].items()}
    optimizer = dict(determined["optimizers_state_dict"][0])
    if "scaler_state_dict" in determined:
        optimizer["loss_scaler"] = determined["scaler_state_dict"]
    epoch, iteration = int(hooks["meta"]["epoch"]), int(hooks["meta"]["iter"])
    text = (ckpt / CONFIG_FILE).read_text()
    model = (
        torch.load(ckpt / MODEL_FILE, map_location="cpu", weights_only=True) if (ckpt / MODEL_FILE).is_file() else {}
    )
    meta = {
        "epoch": epoch,
        "iter": iteration,
        "seed": hooks["meta"].get("seed"),
        "cfg": text,
        "dataset_meta": (model.get("meta") or {}).get("dataset_meta", {}),
        "experiment_name": ckpt.name,
        "mmengine_version": mmengine.__version__,
    }
    saved = {
        "meta": meta,
        "state_dict": {**state, **hooks["replaced"]},
        "message_hub": {
            "log_scalars": {},
            "runtime_info": {"epoch": epoch, "iter": iteration},
            "resumed_keys": {"epoch": True, "iter": True},
        },
        "optimizer": optimizer,
        "param_schedulers": list(determined.get("lr_schedulers_state_dict") or []),
        **hooks["added"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, out)
    logger.info(
        "exported %s -> %s (mmengine's Runner checkpoint at iteration %d, epoch %d)", ckpt, out, iteration, epoch
    )
    return out


# ---- predict --------------------------------------------------------------------------------------


def inferencer(model_dir: Path, device: str | None = None):
    """mmdet's DetInferencer on a model directory, checkpoint, run, or Runner checkpoint (read weights-only)."""
    from mmdet.apis import DetInferencer

    from det_mmdet import logs

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # DetInferencer has read both files when it returns; its loader's and registry's lines only with --verbose.
    with tempfile.TemporaryDirectory() as scratch, logs.inferencer_chatter():
        files = model_files(model_dir, Path(scratch))
        return DetInferencer(
            model=str(files / CONFIG_FILE), weights=str(files / MODEL_FILE), device=device, show_progress=False
        )


def collect_inputs(inputs: Iterable[str], scratch: Path) -> list[tuple[str, Path]]:
    """(name as given, local file) for every image: files, folders (recursively), s3:// and gs:// URIs."""
    found: list[tuple[str, Path]] = []
    for item in inputs:
        if item.startswith(backends.REMOTE_PREFIXES):
            from mmengine.fileio import get

            local = scratch / item.split("://", 1)[1]
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(get(item))
            found.append((item, local))
            continue
        path = Path(item)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise UserError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
            found += [(str(p), p) for p in images]
        elif path.is_file():
            found.append((str(path), path))
        else:
            raise UserError(f"{item} does not exist")
    return found


def predict(model_dir: Path, inputs: list[str], out: Path, score_thr: float = 0.3) -> Path:
    """One picture per image with boxes/masks/classes/scores drawn, plus ``results.json`` (COCO results)."""
    import numpy as np
    from pycocotools import mask as mask_utils
    from tqdm import tqdm

    model = inferencer(model_dir)
    classes = list(model.model.dataset_meta.get("classes") or [])
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for image_id, (name, local) in enumerate(tqdm(collect_inputs(inputs, Path(scratch)), desc="predict"), 1):
            got = model(
                str(local), out_dir=str(out), pred_score_thr=score_thr, return_datasamples=True, no_save_pred=True
            )
            sample = got["predictions"][0]
            height, width = sample.metainfo["ori_shape"][:2]
            images.append({"id": image_id, "file_name": name, "width": int(width), "height": int(height)})
            pred = sample.pred_instances
            keep = pred.scores >= score_thr
            masks = pred.masks[keep].cpu().numpy() if "masks" in pred else None
            for i, (box, score, label) in enumerate(
                zip(pred.bboxes[keep], pred.scores[keep], pred.labels[keep], strict=True)
            ):
                x1, y1, x2, y2 = (float(v) for v in box)
                entry = {
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
                if masks is not None:
                    rle = mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8)))
                    entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
                results.append(entry)
    (out / "results.json").write_text(json.dumps(results))
    categories = [{"id": i + 1, "name": c} for i, c in enumerate(classes)]
    (out / "images.json").write_text(json.dumps({"images": images, "categories": categories}, indent=1))
    logger.info("%d detections on %d images -> %s (pictures in %s)", len(results), len(images), out, out / "vis")
    return out


# ---- evaluate -------------------------------------------------------------------------------------


def evaluate(
    model_dir: Path, ann: Path, images: Path, out: Path | None = None, batch_size: int = 4, backend: str | None = None
) -> dict:
    """COCO AP/AR over a labelled set, as the trial's validation scores it (bbox, and segm for masks)."""
    from mmengine.dataset import pseudo_collate
    from tqdm import tqdm

    from det_mmdet import coco, logs
    from det_mmdet.data import build_dataset

    for thing, path in (("--ann", ann), ("--images", images)):
        if not path.exists():
            raise UserError(f"{thing} {path} does not exist")
    from mmengine.config import Config

    with tempfile.TemporaryDirectory() as scratch:
        files = model_files(model_dir, Path(scratch))
        model = inferencer(files).model
        cfg = Config.fromfile(str(files / CONFIG_FILE))  # DetInferencer edits its copy's pipeline
    test_mode_config(cfg)
    dataset_cfg = dict(cfg.test_dataloader.dataset)
    classes = list(model.dataset_meta.get("classes") or [])
    dataset_cfg.update(
        data_root="", ann_file=str(ann.resolve()), data_prefix={"img": str(images.resolve()) + "/"}, test_mode=True
    )
    dataset_cfg["metainfo"] = {"classes": tuple(classes)}
    dataset = build_dataset(dataset_cfg, "--ann")
    has_masks = "mask_head" in (cfg.model.get("roi_head") or {})
    metric = coco.FastCocoMetric(
        ann_file=str(ann.resolve()),
        metric=["bbox", "segm"] if has_masks else ["bbox"],
        classwise=True,
        backend=coco.check_backend(backend or coco.DEFAULT_BACKEND, "--coco-backend"),
    )
    metric.dataset_meta = dataset.metainfo
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=pseudo_collate)
    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluate"):
            outputs = model.test_step(batch)
            metric.process(batch, [o.to_dict() for o in outputs])  # as mmengine's Evaluator hands them
    with logs.chatter():  # the tables are printed below, once
        scores = {k.split("/")[-1]: float(v) for k, v in metric.evaluate(len(dataset)).items()}  # all numbers
    print("\n".join(metric.tables))
    write_outputs(out, scores, metric.class_ap)
    return scores


STANDARD_MAX_DETS = (1, 10, 100)  # COCO's own evaluation (a results file is scored as the COCO server does)


def evaluate_results(results: Path, ann: Path, out: Path | None = None, backend: str | None = None) -> dict[str, float]:
    """COCO AP/AR of a results file (``image_id, category_id, bbox, score`` [+ ``segmentation``]), no model."""
    from det_mmdet import coco, results_file

    backend = coco.check_backend(backend or coco.DEFAULT_BACKEND, "--coco-backend")
    if not ann.is_file():
        raise UserError(f"--ann {ann} does not exist")
    found = results_file.read(results)
    try:
        gt = coco.ground_truth(results_file.read_json(ann, "--ann"), backend)
    except (KeyError, TypeError) as e:
        raise UserError(f"--ann {ann} is not a COCO annotation file ({e})") from None
    results_file.check_images(results, ann, found.image_ids, gt.getImgIds())
    names = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    # segm is scored by the mask's own area, as mmdet and detectron2 do: without the box
    kinds = {kind: value for kind, value in (("bbox", found.bbox), ("segm", found.segm)) if value is not None}
    scores: dict[str, float] = {}
    class_ap: dict[str, dict[str, float]] = {}
    for kind, detections in kinds.items():
        evaluation = coco.match(gt, detections, kind, backend, max_dets=STANDARD_MAX_DETS)
        stats = coco.summary(evaluation)
        print(coco.table(stats, kind, evaluation.params))
        scores.update({f"{kind}_{name}": round(stats[i], 3) for i, name in enumerate(coco.DETECTION_ITEMS)})
        coco.add_class_aps(evaluation, kind, names, scores, class_ap)
    write_outputs(out, scores, class_ap)
    return scores


def write_outputs(out: Path | None, scores: dict[str, float], class_ap: dict[str, dict[str, float]]) -> None:
    """metrics.json and per_class_ap.md (AP at IoU 0.50:0.95 per class and IoU type; -1: no ground truth)."""
    from det_mmdet.coco import class_table

    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(scores, indent=1))
    (out / "per_class_ap.md").write_text(class_table(class_ap) + "\n")

"""mmdet configs that cannot run here, named in one line instead of a library's raw exception.

Each case fails under mmengine's Runner too, with an exception from deep inside mmdet or mmcv; here
it is an ``error:`` line that says what to install, which device an op needs or which annotation the
pipeline expects, as early as it can be known:

- :func:`check_config`, before anything is built: packages a config's parts import when they are
  built (panopticapi for panoptic annotations and metrics, fairscale for ``num_cp`` activation
  checkpointing in DETR-like encoders, transformers for their language models alongside those).
- :func:`check_data`, once the data sets exist: a semantic branch (HTC, SCNet) whose semantic maps
  the training set does not give; :func:`check_model`, once the model exists: mmcv ops this mmcv
  build runs on CUDA only, on a machine without one.
- :func:`explained`, around the model's forward: the same causes met at the first batch by a model
  that builds them in a way the checks above do not see.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator
from typing import Any

import torch

from det_mmdet.errors import UserError

PANOPTICAPI = "git+https://github.com/cocodataset/panopticapi.git"  # not on PyPI; mmdet's own advice
# Config types whose construction imports panopticapi (mmdet raises "panopticapi is not installed").
NEEDS_PANOPTICAPI = ("LoadPanopticAnnotations", "CocoPanopticMetric")

# mmcv ops (module class -> kernel) that mmcv 2.1.0 implements for CUDA only (no csrc/pytorch/cpu/ file);
# tests/test_unsupported.py runs each on CPU tensors to keep this list true for the installed build.
CUDA_ONLY = {
    "MaskedConv2d": "masked_im2col_forward",
    "CARAFE": "carafe_forward",
    "CARAFEPack": "carafe_forward",
    "RoIPool": "roi_pool_forward",
    "DeformRoIPool": "deform_roi_pool_forward",
    "DeformRoIPoolPack": "deform_roi_pool_forward",
    "ModulatedDeformRoIPoolPack": "deform_roi_pool_forward",
}


# The parts of a config the trial builds (the top-level pipelines and test_* are copies or unused).
TRIAL_READS = ("model", "train_dataloader", "val_dataloader", "val_evaluator")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(dotted path, dict)`` for every dict in a config tree, the config's own key names."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}.{i}")


def _kind(node: dict[str, Any]) -> str:
    return str(node.get("type", "")).split(".")[-1]


def check_config(cfg) -> None:
    """Packages the config's parts need, named with the keys that need them, before any is built."""
    tree = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    needs: dict[str, list[str]] = {}  # package -> why
    read = {key: tree[key] for key in TRIAL_READS if tree.get(key)}  # not train_pipeline & co., which repeat them
    for path, node in walk(read):
        kind = _kind(node)
        if kind in NEEDS_PANOPTICAPI and not installed("panopticapi"):
            needs.setdefault("panopticapi", []).append(f"{path} ({kind})")
        if int(node.get("num_cp") or 0) > 0 and not installed("fairscale"):
            needs.setdefault("fairscale", []).append(
                f"{path}.num_cp={node['num_cp']} (activation checkpointing; num_cp=0 builds without it)"
            )
        if kind == "BertModel" and not installed("transformers"):
            hub = f", which loads {node['name']!r} from the Hugging Face hub" if node.get("name") else ""
            needs.setdefault("transformers", []).append(f"{path} (BertModel{hub})")
    if set(needs) <= {"transformers"}:  # a language model alone: build_detector says so, as it always has
        return
    model = (tree.get("model") or {}).get("type", "the model")
    packages = sorted(needs)
    commands = " ".join(PANOPTICAPI if p == "panopticapi" else p for p in packages)
    why = "; ".join(f"{p}: {', '.join(needs[p])}" for p in packages)
    plural = "packages" if len(packages) > 1 else "package"
    raise UserError(f"{model} needs the {' and '.join(packages)} {plural}: pip install {commands} ({why})")


def check_model(model: torch.nn.Module, device: torch.device) -> None:
    """mmcv ops of the built model that this mmcv build runs on CUDA only, off CUDA."""
    if device.type == "cuda":
        return
    for name, module in model.named_modules():
        op = CUDA_ONLY.get(type(module).__name__)
        if op is not None and type(module).__module__.startswith("mmcv.ops"):
            raise UserError(
                f"model.{name} ({type(module).__name__}) runs mmcv's {op}, which this mmcv build implements "
                "for CUDA only: this model needs a CUDA device (mmengine's Runner fails on a CPU too)"
            )


def _train_dataset_path(cfg) -> tuple[str, dict[str, Any]]:
    """The dataset config that reads the annotations, and its key (wrappers: ``.dataset`` inside)."""
    path, node = "train_dataloader.dataset", dict(cfg.train_dataloader.dataset)
    while "dataset" in node and "ann_file" not in node:
        path, node = f"{path}.dataset", dict(node["dataset"])
    return path, node


def check_data(cfg, train_set) -> None:
    """A semantic branch (HTC, SCNet) trains on semantic maps: the training set must give their paths."""
    if not _semantic_branches(cfg) or len(train_set) == 0:
        return
    if train_set.get_data_info(0).get("seg_map_path") is None:
        raise UserError(semantic_maps_message(cfg))


def _semantic_branches(cfg) -> list[str]:
    """Where the model config has a semantic head (``model.roi_head`` for HTC and SCNet)."""
    model_cfg = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    return [path for path, node in walk(model_cfg, "model") if node.get("semantic_head")]


def semantic_maps_message(cfg) -> str:
    branch = (_semantic_branches(cfg) or ["model.roi_head"])[0]
    head = f"{branch}.semantic_head"
    path, node = _train_dataset_path(cfg)
    loads = any(
        _kind(step) == "LoadAnnotations" and step.get("with_seg") for _, step in walk(node.get("pipeline") or [])
    )
    pipeline = f"; {path}.pipeline loads them (LoadAnnotations with_seg=True)" if loads else ""
    return (
        f"{head} trains on semantic segmentation maps, which {path} does not give (no {path}.data_prefix.seg)"
        f"{pipeline}: set {path}.data_prefix.seg to the folder of the maps (mmdet's COCO: stuffthingmaps/train2017/), "
        f"or train without the semantic branch: --set {branch}.semantic_head=null "
        f"--set {branch}.semantic_roi_extractor=null"
    )


MISSING_KERNEL = re.compile(r"(\w+?)(?:_impl)?: implementation for device (\w+) not found")


@contextlib.contextmanager
def explained(cfg) -> Iterator[None]:
    """The model's forward: a missing mmcv kernel or a ground truth the pipeline did not give, in one line."""
    try:
        yield
    except RuntimeError as e:
        found = MISSING_KERNEL.search(str(e))
        if found is None:
            raise
        op, device = found.groups()
        raise UserError(
            f"mmcv's {op} has no {device.upper()} kernel in this mmcv build: this model needs a CUDA device"
        ) from None
    except AttributeError as e:
        found = re.search(r"'DetDataSample' object has no attribute '_(gt_\w+)'", str(e))
        if found is None:
            raise
        if found.group(1) == "gt_sem_seg":
            raise UserError(semantic_maps_message(cfg)) from None
        raise UserError(
            f"the model reads {found.group(1)} of each sample, which the training pipeline does not give "
            f"(its LoadAnnotations / PackDetInputs in {_train_dataset_path(cfg)[0]}.pipeline)"
        ) from None

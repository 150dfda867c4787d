"""mmdet configs that cannot run here end in one ``error:`` line naming the cause (det_mmdet/unsupported.py).

Each is mmdet's own config on the drawn-shapes set, shrunk where a model is built, run the way a user
runs it; each fails under mmengine's Runner too, there with a raw exception.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import det_mmdet, write_experiment


def coco(shapes, **overrides) -> dict:
    return {
        "data_root": f"{shapes}/",
        "train_dataloader.dataset.ann_file": "annotations/train.json",
        "train_dataloader.dataset.data_prefix": {"img": "train/", "_delete_": True},  # a COCO set without maps
        "val_dataloader.dataset.ann_file": "annotations/val.json",
        "val_dataloader.dataset.data_prefix": {"img": "val/", "_delete_": True},
        "val_evaluator.ann_file": f"{shapes}/annotations/val.json",
        **overrides,
    }


def one_error(tmp_path, shapes, config: str, **overrides) -> str:
    hp = {"global_batch_size": 2, "config_file": config, "override_mmdet_config": coco(shapes, **overrides)}
    exp = write_experiment(tmp_path, hp, data={"classes_from_annotations": True})
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "run", "--max-batches", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
    return errors[0]


def missing(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is not None, reason=f"{module} is installed here")


@missing("panopticapi")
def test_maskformer_names_panopticapi(tmp_path, shapes):
    line = one_error(tmp_path, shapes, "maskformer/maskformer_r50_ms-16xb1-75e_coco.py")
    assert line.startswith(
        "error: MaskFormer needs the panopticapi package: pip install git+https://github.com/cocodataset/panopticapi.git"
    )
    assert "train_dataloader.dataset.pipeline.1 (LoadPanopticAnnotations)" in line
    assert "val_evaluator (CocoPanopticMetric)" in line


@missing("fairscale")
def test_grounding_dino_names_fairscale_and_its_language_model(tmp_path, shapes):
    line = one_error(tmp_path, shapes, "grounding_dino/grounding_dino_r50_scratch_8xb2_1x_coco.py")
    assert "GroundingDINO needs the fairscale" in line and "pip install fairscale" in line
    assert "fairscale: model.encoder.num_cp=6 (activation checkpointing; num_cp=0 builds without it)" in line
    if importlib.util.find_spec("transformers") is None:  # named in the same line: one install, not two failures
        assert "transformers: model.language_model (BertModel, which loads 'bert-base-uncased' from the Hugging" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the op runs on CUDA")
def test_guided_anchoring_names_the_cuda_only_op(tmp_path, shapes):
    shrunk = {
        "model.backbone": {"depth": 18, "base_channels": 16, "init_cfg": None},
        "model.neck": {"in_channels": [16, 32, 64, 128], "out_channels": 16},
        "model.bbox_head": {"in_channels": 16, "feat_channels": 16, "stacked_convs": 1},
    }
    line = one_error(tmp_path, shapes, "guided_anchoring/ga-retinanet_r50_fpn_1x_coco.py", **shrunk)
    assert line == (
        "error: model.bbox_head.retina_cls (MaskedConv2d) runs mmcv's masked_im2col_forward, which this mmcv build "
        "implements for CUDA only: this model needs a CUDA device (mmengine's Runner fails on a CPU too)"
    )


@pytest.mark.parametrize("config", ["htc/htc_r50_fpn_1x_coco.py", "scnet/scnet_r50_fpn_1x_coco.py"])
def test_a_semantic_branch_without_semantic_maps_names_the_keys(tmp_path, shapes, config):
    line = one_error(tmp_path, shapes, config)
    assert line == (
        "error: model.roi_head.semantic_head trains on semantic segmentation maps, which train_dataloader.dataset "
        "does not give (no train_dataloader.dataset.data_prefix.seg); train_dataloader.dataset.pipeline loads them "
        "(LoadAnnotations with_seg=True): set train_dataloader.dataset.data_prefix.seg to the folder of the maps "
        "(mmdet's COCO: stuffthingmaps/train2017/), or train without the semantic branch: "
        "--set model.roi_head.semantic_head=null --set model.roi_head.semantic_roi_extractor=null"
    )


def cuda_only_modules():
    """One instance and CPU inputs for every class of ``unsupported.CUDA_ONLY``."""
    from mmcv import ops

    x, rois = torch.rand(1, 4, 8, 8), torch.tensor([[0.0, 0, 0, 4, 4]])
    return {
        "MaskedConv2d": (ops.MaskedConv2d(4, 4, 3, padding=1), (x, torch.ones(1, 8, 8))),
        "CARAFE": (ops.CARAFE(3, 1, 2), (x, torch.rand(1, 9, 16, 16).softmax(1))),
        "CARAFEPack": (ops.CARAFEPack(4, 2), (x,)),
        "RoIPool": (ops.RoIPool((2, 2), 1.0), (x, rois)),
        "DeformRoIPool": (ops.DeformRoIPool((2, 2)), (x, rois)),
        "DeformRoIPoolPack": (ops.DeformRoIPoolPack((2, 2), 4), (x, rois)),
        "ModulatedDeformRoIPoolPack": (ops.ModulatedDeformRoIPoolPack((2, 2), 4), (x, rois)),
    }


def test_the_cuda_only_list_is_true_of_this_mmcv_build():
    """Each listed op really has no CPU kernel here, under the kernel name the error line gives."""
    from det_mmdet import unsupported
    from det_mmdet.errors import UserError

    modules = cuda_only_modules()
    assert set(modules) == set(unsupported.CUDA_ONLY)
    for name, (module, inputs) in modules.items():
        with pytest.raises(RuntimeError, match=f"{unsupported.CUDA_ONLY[name]}_impl: implementation for device cpu"):
            module(*inputs)
        with pytest.raises(UserError, match=f"mmcv's {unsupported.CUDA_ONLY[name]} has no CPU kernel"):
            with unsupported.explained(None):
                module(*inputs)


def test_a_ground_truth_met_only_at_the_first_batch_is_named():
    """The model's forward reading a ground truth the pipeline did not give (mmdet's own AttributeError)."""
    from pathlib import Path

    import mmdet
    from mmdet.structures import DetDataSample
    from mmengine import Config

    from det_mmdet import unsupported
    from det_mmdet.errors import UserError

    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / "htc" / "htc_r50_fpn_1x_coco.py"))
    with pytest.raises(UserError, match=r"^model.roi_head.semantic_head trains on semantic segmentation maps"):
        with unsupported.explained(cfg):
            DetDataSample().gt_sem_seg  # noqa: B018  (the attribute read mmdet's semantic heads make)
    with pytest.raises(UserError, match=r"^the model reads gt_panoptic_seg of each sample, which the training"):
        with unsupported.explained(cfg):
            DetDataSample().gt_panoptic_seg  # noqa: B018

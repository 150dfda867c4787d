"""Shared fixtures: a small drawn-shapes data set and helpers to run ``det-mmdet`` for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from det_mmdet.shapes import make_shapes

ROOT = Path(__file__).resolve().parent.parent
DET_MMDET = Path(sys.executable).parent / "det-mmdet"  # the console script of the environment under test


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """48 training and 16 validation images of drawn shapes (COCO boxes and polygons)."""
    return make_shapes(tmp_path_factory.mktemp("shapes"), train=48, val=16, seed=0)


def write_experiment(directory: Path, hparams: dict, name: str = "exp.yaml", **extra) -> Path:
    exp = {
        "name": "test",
        "hyperparameters": hparams,
        "searcher": {"name": "single", "metric": "bbox_mAP", "smaller_is_better": False},
        **extra,
    }
    path = directory / name
    path.write_text(yaml.safe_dump(exp))
    return path


def shapes_hparams(shapes: Path, config: str = "configs/shapes_faster_rcnn.py", **overrides) -> dict:
    return {
        "global_batch_size": 4,
        "config_file": config,
        "override_mmdet_config": {"data_root": str(shapes) + "/", **overrides},
    }


def det_mmdet(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed console script the way a user does."""
    return subprocess.run(
        [str(DET_MMDET), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]

"""tests/expconf.py against Determined's own expconf test cases, plus the 0.38 master rules it adds."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

import expconf

if expconf.EXPCONF_DIR is None:
    pytest.skip("Determined expconf schemas not found (set DETERMINED_EXPCONF_DIR)", allow_module_level=True)

EXPCONF_DIR = expconf.EXPCONF_DIR


def load_cases() -> list[Any]:
    """Every case with `sane_as` or `sanity_errors` (the others test defaults, merging or completeness)."""
    params = []
    for path in sorted((EXPCONF_DIR / "test_cases").glob("*.yaml")):
        for case in yaml.safe_load(path.read_text()) or []:
            if "sane_as" in case or "sanity_errors" in case:
                params.append(pytest.param(case, id=f"{path.stem}::{case['name']}"))
    return params


CASES = load_cases()


def test_cases_found() -> None:
    # Guards against a silently empty parametrization (wrong directory, renamed keys).
    assert len(CASES) > 100


@pytest.mark.parametrize("case", CASES)
def test_determined_case(case: dict[str, Any]) -> None:
    config = case["case"]
    # Determined's cases test the schema layer, which predates the 0.38 master rules (several "valid" experiments
    # use the legacy `model_def:Trial` entrypoint), so they run without them; see the extra assertion below.
    for schema_id in case.get("sane_as") or []:
        assert expconf.sanity_errors(config, schema_id, master_checks=False) == [], schema_id
        if schema_id == expconf.EXPERIMENT:
            # With the 0.38 rules on, the only new errors are about the legacy entrypoint, exactly when used.
            extra = expconf.sanity_errors(config, schema_id)
            legacy = isinstance(config.get("entrypoint"), str) and ":" in config["entrypoint"]
            assert bool(extra) == legacy, extra
            assert all(e.startswith("<config>.entrypoint:") for e in extra), extra

    for schema_id, expected in (case.get("sanity_errors") or {}).items():
        errors = expconf.sanity_errors(config, schema_id, master_checks=False)
        assert errors, f"{schema_id} accepted the config"
        # Like Determined's own runner: every expected entry is a regex that some error must match.
        for pattern in expected:
            assert any(re.search(pattern, e) for e in errors), f"{pattern!r} not in {errors}"


def experiment(**overrides: Any) -> dict[str, Any]:
    """A small experiment config that is sane under the 0.38 rules."""
    return {
        "name": "test",
        "entrypoint": "python3 train.py",
        "hyperparameters": {"global_batch_size": 4, "lr": {"type": "log", "base": 10, "minval": -4, "maxval": -2}},
        "searcher": {"name": "single", "metric": "bbox_mAP", "smaller_is_better": False},
        **overrides,
    }


ASHA = {"name": "adaptive_asha", "metric": "bbox_mAP", "smaller_is_better": False, "max_trials": 8}


def test_sane_experiment() -> None:
    assert expconf.sanity_errors(experiment()) == []
    asha = {**ASHA, "time_metric": "batches", "max_time": 1000}
    assert expconf.sanity_errors(experiment(searcher=asha)) == []


@pytest.mark.parametrize("missing", ["time_metric", "max_time"])
def test_adaptive_asha_needs_time_metric_and_max_time(missing: str) -> None:
    searcher = {**ASHA, "time_metric": "batches", "max_time": 1000}
    del searcher[missing]
    # The schema alone accepts it; the 0.38 master does not.
    assert expconf.sanity_errors(experiment(searcher=searcher), master_checks=False) == []
    errors = expconf.sanity_errors(experiment(searcher=searcher))
    assert errors == [f"<config>.searcher: adaptive_asha requires {missing} (Determined >= 0.38)"]


@pytest.mark.parametrize("entrypoint", ["model_def:Trial", "det_mmdet.trial:MMDetTrial", " model_def:Trial "])
def test_legacy_entrypoint_rejected(entrypoint: str) -> None:
    errors = expconf.sanity_errors(experiment(entrypoint=entrypoint))
    assert len(errors) == 1 and errors[0].startswith("<config>.entrypoint: the 'module:TrialClass' form"), errors


@pytest.mark.parametrize(
    "entrypoint",
    [
        "python3 train.py",
        "python3 -m determined.launch.torch_distributed python3 -m det_mmdet.train",
        ["python3", "-m", "determined.launch.torch_distributed", "model_def:Trial"],
    ],
)
def test_command_entrypoint_accepted(entrypoint: str | list[str]) -> None:
    assert expconf.sanity_errors(experiment(entrypoint=entrypoint)) == []


def test_errors_carry_paths() -> None:
    config = experiment(hyperparameters={"lr": {"type": "double", "minval": 1, "maxval": 0}}, max_restarts=-1)
    errors = expconf.sanity_errors(config)
    assert "<config>.hyperparameters.lr: minval must be less than maxval" in errors
    assert any(e.startswith("<config>.max_restarts: ") for e in errors), errors


@pytest.mark.parametrize(
    ("host_path", "storage_path", "ok"),
    [("/tmp", "/tmp", True), ("/tmp", "/tmp/a/../b", True), ("/tmp", "/tmpfoo", False), ("rel", "/x", True)],
)
def test_storage_path_inside_host_path(host_path: str, storage_path: str, ok: bool) -> None:
    config = {"type": "shared_fs", "host_path": host_path, "storage_path": storage_path}
    assert (expconf.sanity_errors(config, expconf.SCHEMA_BASE + "shared-fs.json") == []) == ok

"""``det-mmdet compose``: a Determined experiment from config groups, with hydra-core's compose API.

    det-mmdet compose model=rtmdet data=custom optimizer=adamw searcher=asha [key=value ...] [-o exp.yaml]

The groups live in ``experiments/hydra/`` (``model/``, ``data/``, ``optimizer/``, ``searcher/``, each
with a default in ``config.yaml``); ``key=value`` sets any key of the composed experiment
(``resources.slots_per_trial=2``, ``hyperparameters.global_batch_size=8``). The result is printed,
or written with ``-o``; ``--submit`` creates it on the Determined master (``DET_MASTER``) with
``model_def/`` as its context directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from det_mmdet.config import CONTEXT_DIR
from det_mmdet.errors import UserError

HYDRA_DIR = CONTEXT_DIR.parent / "experiments" / "hydra"


def groups(config_dir: Path = HYDRA_DIR) -> dict[str, list[str]]:
    """Each config group and its options (the YAML files in its folder)."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(config_dir.iterdir())
        if d.is_dir() and not d.name.startswith(("_", "."))
    }


def check_overrides(overrides: list[str], choices: dict[str, list[str]]) -> None:
    """``group=option`` against the groups' options, ``key=value`` for the form; one line otherwise."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"compose: {item!r} is not key=value (groups: {', '.join(choices)})")
        if key in choices and value not in choices[key]:
            raise UserError(f"compose: {key}={value}: no such {key} (choose {', '.join(choices[key])})")


def compose_experiment(overrides: list[str], config_dir: Path = HYDRA_DIR) -> dict[str, Any]:
    """The experiment as plain data: groups composed, interpolations resolved, ``meta`` dropped."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not (config_dir / "config.yaml").is_file():
        raise UserError(f"compose: no config.yaml in {config_dir}")
    check_overrides(overrides, groups(config_dir))
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
        experiment = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:  # e.g. a key the experiment does not have
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"compose: {first} (a new key needs a leading +, as in +data.cache_dir=/tmp/c)") from None
    assert isinstance(experiment, dict)
    experiment.pop("meta", None)
    return experiment


def write(experiment: dict[str, Any], out: Path | None) -> str:
    text = "# Composed by det-mmdet compose from experiments/hydra/.\n" + yaml.safe_dump(experiment, sort_keys=False)
    if out is not None:
        out.write_text(text)
    return text


def submit(experiment: dict[str, Any]) -> int:
    """Create the experiment on the master named by ``DET_MASTER`` with Determined's Python SDK."""
    from determined.experimental import client

    master = os.environ.get("DET_MASTER")
    if not master:
        raise UserError("compose --submit: set DET_MASTER to your Determined master (and log in with `det user login`)")
    try:
        client.login(master=master)
        created = client.create_experiment(config=experiment, model_dir=str(CONTEXT_DIR))
    except (ConnectionError, OSError) as e:  # requests' connection errors are OSErrors
        raise UserError(f"compose --submit: cannot reach the Determined master at {master} ({e})") from None
    return int(created.id)

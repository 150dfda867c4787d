"""``visualizer.vis_backends``: what the trial reports to Determined, also written to mmengine's backends.

Under mmengine's Runner, ``LoggerHook`` hands each training log (loss terms, ``lr``) and each
validation's metrics (``coco/bbox_mAP``, ...) to the Visualizer, which writes them to every backend of
``visualizer.vis_backends``: TensorBoard, W&B, MLflow, ClearML, Neptune, DVCLive, Aim, local JSON. A
team's dashboards are built on those, so here the chief builds the same backends from the config and
sends them the scalars it reports to Determined: each training report (averaged over the report
period) and each validation, both at the number of batches trained (the Runner's iteration; its
LoggerHook puts validations of epoch-based loops at the epoch instead), under mmengine's names. The
config goes to every backend once, at start-up, which is also when a backend whose package is not
installed stops the run in one line (mmengine's own import check, turned into a ``UserError``).

Files go where the Runner puts them, ``<log dir>/vis_data``: ``--output-dir/vis_data`` locally, and on
a cluster ``vis_data`` inside the trial's TensorBoard directory, which Determined uploads with it. A
backend's own ``save_dir`` wins, as under the Runner.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from determined import pytorch

from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")

KEY = "visualizer.vis_backends"


def configured(cfg) -> list[Any]:
    """The config's backends (dicts or built backends), as a list."""
    backends = (cfg.get("visualizer") or {}).get("vis_backends") or []
    return [backends] if isinstance(backends, dict) else list(backends)


def save_root(trial: Any) -> Path:
    """``vis_data`` in the run's directory: ``--output-dir`` locally, the trial's TensorBoard directory on a cluster."""
    base = trial.output_dir if trial.output_dir is not None else Path(trial.context.get_tensorboard_path())
    return Path(base) / "vis_data"


def callbacks(trial: Any) -> dict[str, pytorch.PyTorchCallback]:
    """``{"vis_backends": ...}`` on the chief when the config names backends; nothing elsewhere."""
    specs = configured(trial.cfg)
    if not specs or trial.rank != 0:
        return {}
    runner = trial.hooks.runner
    reducer = trial.reducer
    sink = VisBackends(specs, save_root(trial), trial.cfg, lambda: runner.iter, lambda: reducer.names)
    return {"vis_backends": sink}


def build(specs: list[Any], save_dir: Path) -> dict[str, Any]:
    """``{name: backend}`` as mmengine's Visualizer builds them (``name`` key, ``save_dir`` default)."""
    from mmengine.registry import VISBACKENDS
    from mmengine.visualization.vis_backend import BaseVisBackend

    built: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        name = None
        if isinstance(spec, BaseVisBackend):
            backend = spec
        else:
            spec = copy.deepcopy(dict(spec))
            name = spec.pop("name", None)
            spec.setdefault("save_dir", str(save_dir))
            try:
                backend = VISBACKENDS.build(spec)
            except KeyError as e:  # the registry's "X is not in the vis_backend registry"
                raise UserError(f"{KEY}[{i}]: {e.args[0] if e.args else e}") from None
            except TypeError as e:  # an argument the backend does not take
                raise UserError(f"{KEY}[{i}] ({spec.get('type')}): {e}") from None
        name = name or type(backend).__name__
        if name in built:
            raise UserError(f"{KEY}: two backends named {name!r}; give one a name")
        built[name] = backend
    return built


def missing_package(error: ImportError) -> str:
    """The package a backend's ``_init_env`` asked for (mmengine: 'Please run "pip install -U wandb"')."""
    wanted = re.search(r"pip install (?:-U )?([\w.\-]+)", str(error))
    if wanted:
        return wanted.group(1)
    inner = error.__context__ if isinstance(error.__context__, ImportError) else error
    return str(getattr(inner, "name", None) or error)


class VisBackends(pytorch.PyTorchCallback):
    """The chief's training and validation scalars to each configured backend, closed at shutdown.

    ``iteration()`` gives the batches trained; ``names()`` maps a validation key as Determined gets it
    (``bbox_mAP``) to mmengine's (``coco/bbox_mAP``), as the evaluator reducer found them.
    """

    def __init__(
        self,
        specs: list[Any],
        save_dir: Path,
        cfg,
        iteration: Callable[[], int],
        names: Callable[[], dict[str, str]] = dict,
    ) -> None:
        self.iteration, self.names = iteration, names
        self.backends = build(specs, save_dir)
        config = copy.deepcopy(cfg)
        config.work_dir = str(save_dir)  # the Runner's work_dir, where MLflow and ClearML collect artifacts at close
        try:
            for name, backend in self.backends.items():
                self._start(name, backend, config)
        except BaseException:
            self.on_trial_shutdown()
            raise
        shown = ", ".join(
            f"{name} ({getattr(b, '_save_dir', None) or 'its own store'})" for name, b in self.backends.items()
        )
        logger.info("vis_backends: training and validation scalars also go to %s", shown)

    @staticmethod
    def _start(name: str, backend: Any, config) -> None:
        """The backend's environment (its package imported, its run opened), then the config, as the Runner does."""
        try:
            backend.add_config(config)
        except ImportError as e:
            package = missing_package(e)
            raise UserError(
                f"{KEY}: {name} needs the {package} package, which is not installed: pip install {package}"
            ) from None
        except Exception as e:  # its service refused (a login, a server, a store): say which backend, at start-up
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{KEY}: {name} could not start: {type(e).__name__}: {first}") from e

    def _send(self, scalars: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in scalars.items() if _is_number(v)}
        if not values:
            return
        step = int(self.iteration())
        for backend in self.backends.values():
            backend.add_scalars(values, step=step)

    def on_training_workload_end(self, avg_metrics: dict[str, Any], batch_metrics: Any) -> None:
        self._send(avg_metrics)  # loss terms and lr, named as mmengine's log_vars and LogProcessor name them

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        names = self.names()
        self._send({names.get(k, k): v for k, v in metrics.items()})

    def on_trial_shutdown(self) -> None:
        for backend in self.backends.values():
            backend.close()


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True

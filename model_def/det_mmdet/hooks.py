"""mmengine hooks inside the trial: built from the config and called where mmengine's Runner calls them.

The Runner's hooks come from ``default_hooks`` and ``custom_hooks``. Some of its default hooks do
what Determined (or the trial) does here, and are not run:

    IterTimerHook        Determined times batches and reports throughput
    LoggerHook           Determined's metric reports (``metrics.jsonl`` locally, the WebUI on a cluster)
    ParamSchedulerHook   the trial steps ``param_scheduler`` after each batch / epoch, as this hook does
    CheckpointHook       Determined checkpoints (``--checkpoint-period``, ``max_keep_ckpts``, checkpoint_policy)
    DistSamplerSeedHook  the trial's sampler reshuffles with ``seed + epoch``

``RuntimeInfoHook`` (which the Runner always adds: it keeps ``iter``, ``epoch``, ``max_iters`` and
``max_epochs`` in the MessageHub), every ``custom_hooks`` entry and any other ``default_hooks`` entry
run for real, in priority order, with a :class:`RunnerAdapter` as their ``runner``. Before anything
is built, each hook's source is read for the ``runner.<name>`` it uses: a name the adapter does not
provide stops the run at start-up, with one line naming the hook and the name.

Hook state (EMA weights, ...) travels the way the Runner's checkpoints carry it: ``before_save_checkpoint``
fills an mmengine-format checkpoint, ``after_load_checkpoint`` reads it back (see :class:`HooksCallback`).
Hooks that change the training data at an epoch's start (``PipelineSwitchHook``, ``YOLOXModeSwitchHook``)
are also replayed inside each data-loader worker, see :class:`LoaderHooks`.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import logging
import textwrap
from collections.abc import Callable, Iterable
from typing import Any

import torch
from determined import pytorch

from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")

# Default hooks whose work Determined or the trial does (module docstring), by type.
REPLACED = {
    "IterTimerHook": "Determined times batches",
    "LoggerHook": "Determined reports metrics",
    "ParamSchedulerHook": "the trial steps param_scheduler",
    "CheckpointHook": "Determined checkpoints",
    "DistSamplerSeedHook": "the trial's sampler reshuffles each epoch",
}

# What hooks may read from their runner; anything else stops the run at start-up.
SURFACE = frozenset(
    """model cfg iter epoch max_iters max_epochs train_dataloader val_dataloader optim_wrapper
    param_schedulers message_hub rank world_size distributed logger work_dir log_dir timestamp
    experiment_name seed train_loop val_loop _resume""".split()
)

# Semi-supervised training needs the Runner's teacher/student loops; say so instead of training wrongly.
UNSUPPORTED_HOOKS = {"MeanTeacherHook": "semi-supervised training (teacher/student)"}


def hook_type(spec: Any) -> str:
    name = spec.get("type") if isinstance(spec, dict) else type(spec).__name__
    return name if isinstance(name, str) else getattr(name, "__name__", str(name))


def hook_specs(cfg) -> list[tuple[str, dict[str, Any]]]:
    """``(where, spec)`` of every hook to run, in the Runner's registration order."""
    specs: list[tuple[str, dict[str, Any]]] = [("runtime_info", {"type": "RuntimeInfoHook"})]
    for key, spec in (cfg.get("default_hooks") or {}).items():
        if spec is None or key == "runtime_info":
            continue
        kind = hook_type(spec).split(".")[-1]
        if kind in REPLACED:
            continue
        if kind == "DetVisualizationHook":
            if spec.get("draw"):
                raise UserError(
                    f"default_hooks.{key}.draw=True is not supported: draw predictions with `det-mmdet predict`"
                )
            continue  # without draw=True it does nothing
        specs.append((f"default_hooks.{key}", dict(spec)))
    for i, spec in enumerate(cfg.get("custom_hooks") or []):
        specs.append((f"custom_hooks[{i}]", dict(spec)))
    for where, spec in specs:
        kind = hook_type(spec).split(".")[-1]
        if kind in UNSUPPORTED_HOOKS:
            raise UserError(f"{where}: {kind} ({UNSUPPORTED_HOOKS[kind]}) is not supported by det-mmdet")
    return specs


def build_hooks(cfg) -> list[tuple[str, Any]]:
    """The hooks, built with mmengine's registry and sorted by priority (stable, as the Runner's)."""
    from mmengine.registry import HOOKS
    from mmengine.runner import get_priority

    built = []
    for where, spec in hook_specs(cfg):
        spec = copy.deepcopy(spec)
        priority = spec.pop("priority", None)
        try:
            hook = HOOKS.build(spec)
        except KeyError as e:  # the registry's "X is not in the hook registry"
            raise UserError(f"{where}: {e.args[0] if e.args else e}") from None
        except (TypeError, ValueError, AssertionError) as e:  # the hook's own argument checks
            raise UserError(f"{where}: {hook_type(spec)}: {e or type(e).__name__}") from None
        hook.priority = get_priority(priority if priority is not None else hook.priority)
        check_surface(where, hook)
        built.append((where, hook))
    built.sort(key=lambda item: item[1].priority)
    return built


@functools.cache
def runner_names(cls: type) -> frozenset[str]:
    """Every ``runner.<name>`` in the source of ``cls`` and of its bases up to mmengine's ``Hook``."""
    from mmengine.hooks import Hook

    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (Hook, object):
            break
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError) as e:  # no source (compiled, interactive): cannot check, say so
            logger.warning("cannot read the source of %s (%s): its runner attributes are not checked", klass, e)
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "runner":
                names.add(node.attr)
    return frozenset(names)


def check_surface(where: str, hook: Any) -> None:
    missing = sorted(runner_names(type(hook)) - SURFACE)
    if missing:
        raise UserError(
            f"{where}: {type(hook).__name__} reads runner.{missing[0]}, which det-mmdet's trial does not provide "
            f"(it provides {', '.join(sorted(n for n in SURFACE if not n.startswith('_')))})"
        )


def changes_data(hook: Any) -> bool:
    """Whether the hook touches the training loader at an epoch's start (a pipeline switch)."""
    method = type(hook).before_train_epoch
    try:
        source = textwrap.dedent(inspect.getsource(method))
    except (OSError, TypeError):
        return False  # mmengine's own no-op, or no source: runner_names() has already warned
    return any(
        isinstance(n, ast.Attribute) and n.attr == "train_dataloader" and getattr(n.value, "id", None) == "runner"
        for n in ast.walk(ast.parse(source))
    )


class LoaderView:
    """What hooks see as ``runner.train_dataloader`` / ``val_dataloader``: the mmdet dataset and sizes.

    ``persistent_workers`` is False on purpose: hooks that switch pipelines restart a persistent
    loader's workers when they see True; here the switch reaches the workers by :class:`LoaderHooks`.
    """

    persistent_workers = False

    def __init__(self, dataset, batch_size: int, num_workers: int, length: int) -> None:
        self.dataset, self.batch_size, self.num_workers, self._length = dataset, batch_size, num_workers, length

    def __len__(self) -> int:
        return self._length


class LoopView:
    """``runner.train_loop`` / ``val_loop``: counters, the loader, and ``stop_training`` (EarlyStoppingHook)."""

    def __init__(self, runner: RunnerAdapter, dataloader: LoaderView, stop: Callable[[], None] | None) -> None:
        self._runner, self.dataloader, self._stop = runner, dataloader, stop
        self._stop_training = False

    iter = property(lambda self: self._runner.iter)
    epoch = property(lambda self: self._runner.epoch)
    max_iters = property(lambda self: self._runner.max_iters)
    max_epochs = property(lambda self: self._runner.max_epochs)

    @property
    def stop_training(self) -> bool:
        return self._stop_training

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        if value and self._stop is None:
            raise UserError("a hook asked the validation loop to stop training")
        self._stop_training = bool(value)
        if value:
            self._stop()  # Determined checkpoints, then ends the trial


class RunnerAdapter:
    """What mmengine hooks read from a Runner, backed by the trial (``SURFACE`` lists every name).

    ``iter`` and ``epoch`` follow the Runner's loops: during a batch ``iter`` is the number of batches
    already trained, and it and ``epoch`` (for epoch-based configs) advance after the ``after_*`` hooks.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        cfg,
        optim_wrapper,
        param_schedulers: list,
        train_loader: LoaderView,
        val_loader: LoaderView,
        max_iters: int,
        max_epochs: int,
        rank: int,
        world_size: int,
        seed: int,
        work_dir: str,
        stop: Callable[[], None],
    ) -> None:
        import time

        from mmengine.logging import MessageHub, MMLogger

        self.model, self.cfg, self.optim_wrapper = model, cfg, optim_wrapper
        self.param_schedulers = param_schedulers
        self.train_dataloader, self.val_dataloader = train_loader, val_loader
        self.max_iters, self.max_epochs = max_iters, max_epochs
        self.rank, self.world_size, self.distributed = rank, world_size, world_size > 1
        self.seed, self.work_dir, self.log_dir = seed, work_dir, work_dir
        self.timestamp = time.strftime("%Y%m%d_%H%M%S")
        self.experiment_name = cfg.get("experiment_name") or f"det_mmdet_{self.timestamp}"
        # The instance components read with MessageHub.get_current_instance() (BatchSyncRandomResize, TOODHead).
        self.message_hub = MessageHub.get_instance(self.experiment_name)
        self.logger = MMLogger.get_current_instance()
        self.iter = 0
        self.epoch = 0
        self._resume = False  # EMAHook: is the checkpoint being loaded a resume (True) or load_from (False)
        self.train_loop = LoopView(self, train_loader, stop)
        self.val_loop = LoopView(self, val_loader, None)


class HookSet:
    """The built hooks and the Runner's calls into them."""

    def __init__(self, hooks: list[tuple[str, Any]], runner: RunnerAdapter, by_epoch: bool) -> None:
        self.hooks, self.runner, self.by_epoch = hooks, runner, by_epoch
        self.in_epoch = False
        self.finished = False
        self.loader_side: list[Any] = []  # hooks whose before_train_epoch the data loader calls (LoaderHooks)

    @property
    def names(self) -> list[str]:
        return [type(h).__name__ for _, h in self.hooks]

    def call(self, fn_name: str, **kwargs: Any) -> None:
        for _, hook in self.hooks:
            if fn_name == "before_train_epoch" and any(hook is h for h in self.loader_side):
                continue
            getattr(hook, fn_name)(self.runner, **kwargs)

    # ---- training --------------------------------------------------------------------------

    def before_iter(self, epoch_idx: int, batch_idx: int, batch: dict[str, Any]) -> None:
        runner = self.runner
        runner.iter = batch_idx
        if not self.in_epoch:  # also the first batch after a resume in the middle of an epoch
            runner.epoch = epoch_idx if self.by_epoch else 0
            self.call("before_train_epoch")
            self.in_epoch = True
        self.call("before_train_iter", batch_idx=self._loop_index(batch_idx), data_batch=batch)

    def after_iter(self, batch_idx: int, batch: dict[str, Any], outputs: dict[str, Any]) -> None:
        self.call("after_train_iter", batch_idx=self._loop_index(batch_idx), data_batch=batch, outputs=outputs)
        self.runner.iter = batch_idx + 1

    def after_epoch(self) -> None:
        """At the end of a Determined epoch (epoch-based configs), or of training (iteration-based)."""
        self.call("after_train_epoch")
        self.in_epoch = False
        if self.by_epoch:
            self.runner.epoch += 1

    def _loop_index(self, batch_idx: int) -> int:
        # EpochBasedTrainLoop counts batches within the epoch, IterBasedTrainLoop from the start.
        return batch_idx % len(self.runner.train_dataloader) if self.by_epoch else batch_idx

    # ---- checkpoints -----------------------------------------------------------------------

    def checkpoint(self, model: torch.nn.Module, dataset_meta: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint the Runner would save now: model weights, then ``before_save_checkpoint``."""
        from det_mmdet.checkpoint import unwrap

        meta = {
            "epoch": self.runner.epoch,
            "iter": self.runner.iter,
            "seed": self.runner.seed,
            "dataset_meta": dataset_meta,
        }
        state = {k: v.detach() for k, v in unwrap(model).state_dict().items()}
        checkpoint = {"meta": meta, "state_dict": state}
        self.call("before_save_checkpoint", checkpoint=checkpoint)
        return checkpoint

    def load_checkpoint(self, checkpoint: dict[str, Any], model: torch.nn.Module, resume: bool) -> None:
        """``after_load_checkpoint``, then the (possibly changed) weights into the model, as the Runner does."""
        from det_mmdet.checkpoint import unwrap

        self.runner._resume = resume
        self.call("after_load_checkpoint", checkpoint=checkpoint)
        unwrap(model).load_state_dict(checkpoint["state_dict"])


class HooksCallback(pytorch.PyTorchCallback):
    """The hooks' side of Determined's checkpoints, validation and shutdown.

    Determined stores the model's own weights; this callback's state is what the hooks added to an
    mmengine checkpoint (``ema_state_dict``, ...) and the weights they replaced in its ``state_dict``
    (EMAHook puts the averaged weights there), so a resume rebuilds the checkpoint the hooks wrote.
    """

    def __init__(self, hooks: HookSet, model: torch.nn.Module, dataset_meta: dict[str, Any]) -> None:
        self.hooks, self.model, self.dataset_meta = hooks, model, dataset_meta
        self.saved: dict[str, Any] | None = None  # this save's checkpoint, for model.pth

    def take_checkpoint(self) -> dict[str, Any]:
        """The checkpoint of the save under way (made by ``state_dict``), handed over once."""
        saved, self.saved = self.saved, None
        return saved if saved is not None else self.hooks.checkpoint(self.model, self.dataset_meta)

    def state_dict(self) -> dict[str, Any]:
        from det_mmdet.checkpoint import to_cpu, unwrap

        checkpoint = self.saved = self.hooks.checkpoint(self.model, self.dataset_meta)
        own = unwrap(self.model).state_dict()
        replaced = {k: v.cpu() for k, v in checkpoint["state_dict"].items() if not _same(v, own.get(k))}
        added = {k: to_cpu(v) for k, v in checkpoint.items() if k not in ("meta", "state_dict")}
        meta = {k: checkpoint["meta"][k] for k in ("epoch", "iter", "seed")}
        return {"meta": meta, "replaced": replaced, "added": added}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from det_mmdet.checkpoint import unwrap

        weights = {k: v.detach().clone() for k, v in unwrap(self.model).state_dict().items()}
        weights.update(state_dict["replaced"])
        checkpoint = {"meta": dict(state_dict["meta"]), "state_dict": weights, **state_dict["added"]}
        self.hooks.load_checkpoint(checkpoint, self.model, resume=True)

    def on_training_start(self) -> None:
        self.hooks.call("before_train")

    def on_validation_start(self) -> None:
        self.hooks.call("before_val")
        self.hooks.call("before_val_epoch")

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        self.hooks.call("after_val_epoch", metrics=metrics)
        self.hooks.call("after_val")

    def on_trial_shutdown(self) -> None:
        if self.hooks.finished:  # the Runner calls these only when training ran to its end
            self.hooks.call("after_train")
            self.hooks.call("after_run")


def _same(a: Any, b: Any) -> bool:
    return a is b or (torch.is_tensor(a) and torch.is_tensor(b) and a.data_ptr() == b.data_ptr())


class LoaderHooks:
    """Pipeline switches, replayed where the training samples are made.

    Determined's training loader keeps its workers for the whole run, and they prepare batches ahead
    of the trial, so a hook that changes ``runner.train_dataloader.dataset`` in the trial's process
    would reach them late or never. Each training index carries the epoch it belongs to (see
    ``data.EpochTaggedBatches``); when a worker meets a new epoch, it calls these hooks'
    ``before_train_epoch`` on its copy of the dataset, as the Runner calls them before that epoch's
    first batch. The trial's process runs the hooks as well (model-side changes such as YOLOX's L1
    loss, and the log lines); the workers' copies log nothing.

    Without workers the samples are made in the trial's process: the hooks themselves are called
    here, once per epoch and before its first sample, and the trial does not call them again.
    """

    SURFACE = frozenset({"model", "epoch", "iter", "max_epochs", "max_iters", "train_dataloader", "logger"})

    def __init__(self, hooks: Iterable[Any], runner: RunnerAdapter, by_epoch: bool, in_process: bool) -> None:
        hooks = list(hooks)
        for hook in hooks:
            missing = sorted(runner_names(type(hook)) - self.SURFACE)
            if missing:
                raise UserError(
                    f"{type(hook).__name__} changes the training data and reads runner.{missing[0]}, which the "
                    f"data-loader workers cannot provide (they have {', '.join(sorted(self.SURFACE))})"
                )
        self.in_process = in_process
        self.hooks = hooks if in_process else [copy.deepcopy(h) for h in hooks]
        self.model, self.train_dataloader = runner.model, runner.train_dataloader
        self.max_epochs, self.max_iters, self.by_epoch = runner.max_epochs, runner.max_iters, by_epoch
        self.logger = runner.logger if in_process else logging.getLogger("det_mmdet.loader")
        if not in_process:
            self.logger.setLevel(logging.WARNING)
        self.epoch = -1
        self.iter = 0

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def at_epoch(self, epoch: int) -> None:
        epoch = epoch if self.by_epoch else 0  # IterBasedTrainLoop: one before_train_epoch, at the start
        if epoch <= self.epoch:
            return
        for e in range(self.epoch + 1, epoch + 1):
            self.epoch = e
            self.iter = e * len(self.train_dataloader)
            for hook in self.hooks:
                hook.before_train_epoch(self)

"""``MMDetTrial``: an MMDetection 3.x config trained by Determined's ``PyTorchTrial`` machinery.

mmdet builds the model, datasets, optimizer, schedulers and evaluator from the resolved config;
Determined owns the loop: sharding, gradient exchange (``context.backward`` /
``context.step_optimizer``), checkpoints, validation periods and the searcher. The config's hooks
run where mmengine's Runner runs them (``hooks.py``). One training step:

    hooks: before_train_epoch (at an epoch's first batch), before_train_iter (MessageHub iter/epoch)
    data = model.data_preprocessor(batch, training=True)
    loss, terms = model.parse_losses(model(**data, mode="loss"))
    context.backward(loss); context.step_optimizer(optimizer, clip_grads)
    hooks: after_train_iter (EMA), then per-iteration schedulers;
    at an epoch's end after_train_epoch, then per-epoch schedulers
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import pickle
import random
import re
from pathlib import Path
from typing import Any

import determined as det
import numpy as np
import torch
import torch.distributed as dist
from determined import pytorch

from det_mmdet import (
    amp,
    checkpoint,
    data,
    environment,
    fast_transforms,
    hooks,
    logs,
    mmengine_checkpoints,
    pictures,
    runner_keys,
    searcher,
    unsupported,
    weights,
    worker_heap,
)
from det_mmdet.errors import UserError
from det_mmdet.evaluation import EvaluatorReducer
from det_mmdet.runner import Schedule, aggregation_frequency

logger = logging.getLogger("det_mmdet")

# Import names of mmdet's optional extras -> their pip packages.
EXTRAS = {"skimage": "scikit-image", "sklearn": "scikit-learn", "transformers": "transformers"}


def per_slot_batch_size(global_batch_size: int, slots: int) -> int:
    if global_batch_size % slots:
        raise UserError(f"hyperparameters.global_batch_size {global_batch_size} is not divisible by {slots} slots")
    return global_batch_size // slots


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def epoch_length(images: int, batch_size: int, slots: int) -> int:
    """Determined's epoch: the chief's share of the batches, ceil(batches / slots).

    Determined counts epochs by the chief's loader (``_PyTorchTrialController``), whose
    ``DistributedBatchSampler`` takes one batch more than the others when the slots do not divide
    the batches.
    """
    batches = -(-images // batch_size)
    return max(1, -(-batches // slots))


def choose_seed(config_seed: Any, trial_seed: int | None) -> tuple[int, str]:
    """The run's seed and where it came from: the config's ``randomness.seed`` wins, as under the Runner.

    Without one, a cluster trial takes Determined's trial seed (each trial of a search its own, from
    ``reproducibility.experiment_seed``) and a local run 0: the one place the two differ (README).
    """
    if config_seed is not None:
        return int(config_seed), "randomness.seed, on a cluster and locally alike"
    if trial_seed is not None:
        return int(trial_seed), "Determined's trial seed: the config sets no randomness.seed"
    return 0, "no randomness.seed in the config; a cluster trial would take Determined's trial seed"


def split_batch(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """``parts`` consecutive slices of a collated batch (lists of inputs and data samples)."""
    if parts == 1:
        return [batch]
    size = -(-len(batch["inputs"]) // parts)
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, len(batch["inputs"]), size)]


def find_unused_parameters_in_ddp(context: pytorch.PyTorchTrialContext) -> None:
    """Make ``context.wrap_model`` build DistributedDataParallel with ``find_unused_parameters=True``.

    Determined constructs the DDP wrapper itself, with torch's defaults and no way to pass options;
    it looks the wrapper class up on the context, so this context gets a subclass carrying the flag.
    """
    base = getattr(type(context), "_PyTorchDistributedDataParallel", None)
    if base is None:  # a Determined release that builds DDP differently: say so rather than ignore it
        raise UserError("find_unused_parameters=True is not supported with this Determined version")

    class FindUnusedDDP(base):  # type: ignore[misc, valid-type]
        def __init__(self, module: torch.nn.Module, **kwargs: Any) -> None:
            super().__init__(module, find_unused_parameters=True, **kwargs)

    context._PyTorchDistributedDataParallel = FindUnusedDDP


def check_supported(cfg) -> None:
    """Configs that need Runner machinery the trial does not have stop here, in one line."""
    model_type = (cfg.get("model") or {}).get("type")
    if model_type in ("SoftTeacher", "SemiBaseDetector"):
        raise UserError(
            f"model.type {model_type!r}: semi-supervised training (teacher/student, MeanTeacherHook) "
            "is not supported by det-mmdet"
        )
    val_loop = (cfg.get("val_cfg") or {}).get("type", "ValLoop")
    if val_loop not in ("ValLoop", "mmengine.ValLoop"):
        raise UserError(f"val_cfg.type {val_loop!r} is not supported by det-mmdet (it validates with ValLoop)")


def revert_sync_batchnorm(model: torch.nn.Module, slots: int, device: torch.device) -> torch.nn.Module:
    """SyncBN as mmengine's Runner treats it: plain BN for one process, kept across several on GPUs."""
    from mmengine.model import revert_sync_batchnorm as revert

    has_sync = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    if not has_sync:
        return model
    if slots == 1:
        return revert(model)
    if device.type == "cpu":
        logger.warning(
            "SyncBatchNorm runs on GPUs only: on CPU each of the %d processes normalises with its own batch "
            "statistics (BatchNorm)", slots,
        )  # fmt: skip
        return revert(model)
    return model


def describe_metric(metric: Any) -> str:
    """One metric of the validation, and for COCO which library scores it (``data.coco_backend``)."""
    kinds = ", ".join(getattr(metric, "metrics", None) or ())
    backend = getattr(metric, "backend", None)
    if backend is None:
        return f"{type(metric).__name__} {kinds}".strip()
    note = "; use_mp_eval applies to pycocotools only" if metric.use_mp_eval and backend != "pycocotools" else ""
    return f"CocoMetric {kinds} scored by {backend} (data.coco_backend{note})"


class MMDetTrial(pytorch.PyTorchTrial):
    def __init__(
        self,
        context: pytorch.PyTorchTrialContext,
        cfg,
        plan: Schedule | None = None,
        output_dir: Path | None = None,
    ) -> None:
        from mmengine.registry import init_default_scope

        self.context = context
        self.cfg = cfg
        self.output_dir = output_dir  # a local run's directory (pictures, TensorBoard); None on a cluster
        check_supported(cfg)
        self.startup_notes = runner_keys.check(cfg)  # refuses in one line what the trial cannot honour
        unsupported.check_config(cfg)  # packages the config's parts import (panopticapi, fairscale)
        logs.ignore_harmless_warnings()
        checkpoint.allow_numpy_rng_state()
        init_default_scope(cfg.get("default_scope", "mmdet"))
        self.rank = context.distributed.get_rank()
        slots = context.distributed.get_size()
        # The hyperparameter itself: Determined's context rounds a size that slots do not divide.
        hparams = context.get_hparams()
        self.batch_size = per_slot_batch_size(int(hparams["global_batch_size"]), slots)
        self.splits = 1  # auto_find_batch_size halves the work per forward pass on CUDA out-of-memory
        self.auto_batch_size = bool(hparams.get("auto_find_batch_size"))
        if self.auto_batch_size and slots > 1:
            raise UserError(
                "hyperparameters.auto_find_batch_size works on one slot; with more, every slot must split "
                "alike, so set training_batch_size instead"
            )

        randomness = cfg.get("randomness") or {}
        info = det.get_cluster_info()
        on_cluster = info is not None and info.task_type == "TRIAL"
        self.cluster_info = info if on_cluster else None
        self.seed, self.seed_source = choose_seed(
            randomness.get("seed"), context.get_trial_seed() if on_cluster else None
        )
        self.loaded_from: str | None = None
        self.runner_checkpoint: dict[str, Any] | None = None  # resume=True: the Runner's checkpoint to continue
        self.continues_at = 0  # the batch that checkpoint was written after (Runner.resume's iter)
        # diff_rank_seed: each process's own random state, as the Runner's; the data order stays shared.
        self._diff_rank_seed = bool(randomness.get("diff_rank_seed"))
        own_seed = self.seed + self.rank if self._diff_rank_seed else self.seed
        seed_everything(own_seed, bool(randomness.get("deterministic", False)))
        self.loader_env, env_lines = environment.apply(cfg.get("env_cfg"), slots)
        self.startup_notes += [f"env_cfg: {line}" for line in env_lines]

        data_section = self.context.get_experiment_config().get("data") or {}  # annotation cache, transforms
        reuse_heap = worker_heap.check_setting(data_section.get("reuse_worker_heap", True))
        self.loader_env = dataclasses.replace(self.loader_env, reuse_heap=reuse_heap)
        self.startup_notes.append(worker_heap.startup_line(reuse_heap))
        self.train_set = data.build_dataset(cfg.train_dataloader.dataset, "train_dataloader.dataset", data_section)
        self.val_set = data.build_dataset(cfg.val_dataloader.dataset, "val_dataloader.dataset", data_section)
        self.classes = list(self.train_set.metainfo.get("classes", ()))
        unsupported.check_data(cfg, self.train_set)  # semantic maps a semantic branch trains on

        built_hooks = hooks.build_hooks(cfg)  # before the model: a hook the trial cannot run stops here
        fast_transforms.swap_hooks(built_hooks, data_section.get("fast_transforms", True))  # PipelineSwitchHook
        model = revert_sync_batchnorm(self._build_model(cfg), slots, context.device)
        unsupported.check_model(model, context.device)  # mmcv ops this build has for CUDA only
        if cfg.get("find_unused_parameters"):
            find_unused_parameters_in_ddp(context)
        self.autocast, scaler = amp.settings(cfg.optim_wrapper.to_dict(), context.device)
        self.val_autocast = amp.validation(dict(cfg.get("val_cfg") or {}), context.device)  # float32 by default
        self.scaler = context.wrap_scaler(scaler) if scaler is not None else None  # Determined: before wrap_model
        self.accumulate = aggregation_frequency(cfg)  # the aggregation_frequency Determined was started with
        self.model = context.wrap_model(model)
        self.optimizer, self.clip_grad, optim_wrapper = self._build_optimizer(cfg, model)
        epoch_len = self.epoch_len = self._epoch_length(slots)
        self.iter_schedulers, self.epoch_schedulers = self._build_schedulers(cfg, epoch_len)

        self.reducer = context.wrap_reducer(
            EvaluatorReducer(
                self._build_evaluator(cfg), self.rank == 0, count_fields(cfg.model), context.distributed.gather
            ),
            for_training=False,
        )
        self.hooks = self._start_hooks(built_hooks, optim_wrapper, epoch_len, plan)
        self.losses = self._compiled(self._losses, cfg.get("compile"))
        if self.rank == 0:
            for line in self._summary(model, slots, epoch_len, plan):
                logger.info(line)

    # ---- construction --------------------------------------------------------------------------

    def _build_model(self, cfg):

        check_class_counts(cfg.model, self.classes)  # before any weights are fetched
        if cfg.get("data_preprocessor") is not None:  # the Runner's top-level default for the model's
            cfg.model.setdefault("data_preprocessor", cfg.data_preprocessor)
        model = build_detector(cfg.model)
        source = str(cfg.load_from) if cfg.get("load_from") else None
        if source is not None and cfg.get("resume"):  # the Runner's state too, taken once the hooks exist
            self.runner_checkpoint = mmengine_checkpoints.load(weights.local_copy(source), f"load_from: {source}")
            mmengine_checkpoints.check_resumable(self.runner_checkpoint, f"load_from: {source}")
            state = self.runner_checkpoint["state_dict"]
        else:
            state = weights.read_state_dict(weights.local_copy(source), source) if source else None
        weights.resolve_pretrained_inits(model, state)  # ImageNet backbones from the cache / mirror
        try:
            with logs.quiet_mmengine():
                model.init_weights()  # mmengine logs one INFO paragraph per parameter
        except pickle.UnpicklingError as e:  # torch's weights-only loader refused an init_cfg checkpoint
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"model init_cfg: a Pretrained checkpoint is not weights-only ({first})") from None
        if source is not None and self.runner_checkpoint is None:
            weights.load_into(model, source, state)
        self.loaded_from = source
        return model

    def _build_optimizer(self, cfg, model):
        """Optimizer with mmengine's param-wise rules; clipping and AMP (``amp.settings``) are applied by us."""
        from mmengine.optim import build_optim_wrapper

        wrapper_cfg = copy.deepcopy(cfg.optim_wrapper.to_dict())
        clip_grad = wrapper_cfg.pop("clip_grad", None)
        for key in ("type", "dtype", "loss_scale", "use_fsdp", "accumulative_counts"):
            wrapper_cfg.pop(key, None)  # read by amp.settings, runner_keys, Determined's aggregation_frequency
        with logs.quiet_mmengine(), logs.harmless_dropped():  # INFO per parameter; shared modules
            built = build_optim_wrapper(model, dict(type="OptimWrapper", **wrapper_cfg))
        optimizer = self.context.wrap_optimizer(built.optimizer)
        built.optimizer = optimizer  # hooks read learning rates through the wrapper (RuntimeInfoHook)
        self._scale_lr(cfg.get("auto_scale_lr"), optimizer)  # before the schedulers record initial lrs
        return optimizer, clip_grad, built

    def _epoch_length(self, slots: int) -> int:
        return epoch_length(len(self.train_set), self.batch_size, slots)

    def _scale_lr(self, auto_scale_lr: dict[str, Any] | None, optimizer: torch.optim.Optimizer) -> None:
        """mmengine's ``auto_scale_lr``: every group's lr times the global batch over ``base_batch_size``."""
        if not auto_scale_lr or not auto_scale_lr.get("enable", False):
            return
        if not auto_scale_lr.get("base_batch_size"):
            raise UserError("auto_scale_lr: enable=True needs base_batch_size")
        real = self.batch_size * self.context.distributed.get_size()  # the Runner's world size x batch size
        ratio = real / float(auto_scale_lr["base_batch_size"])
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * ratio
        self.startup_notes.append(
            f"auto_scale_lr: lr x {ratio:g} (global batch {real} / base_batch_size {auto_scale_lr['base_batch_size']})"
        )

    def _build_schedulers(self, cfg, epoch_len: int):
        from mmengine.registry import PARAM_SCHEDULERS

        specs = cfg.get("param_scheduler") or []
        specs = [specs] if isinstance(specs, dict) else specs
        per_iter, per_epoch = [], []
        self.schedulers = []  # config order: how a Runner checkpoint lists their states
        for spec in specs:
            spec = copy.deepcopy(dict(spec))
            default_args = {"optimizer": self.optimizer, "epoch_length": epoch_len}
            scheduler = PARAM_SCHEDULERS.build(spec, default_args=default_args)
            self.context.wrap_lr_scheduler(scheduler, pytorch.LRScheduler.StepMode.MANUAL_STEP)
            (per_epoch if scheduler.by_epoch else per_iter).append(scheduler)
            self.schedulers.append(scheduler)
        return per_iter, per_epoch

    def _start_hooks(self, built: list, optim_wrapper, epoch_len: int, plan) -> hooks.HookSet:
        """The adapter the hooks see, then ``before_run`` (and ``after_load_checkpoint`` for load_from)."""
        by_epoch = _epoch_based(self.cfg)
        max_iters, max_epochs = _lengths(self.cfg, plan, epoch_len)
        workers = int(self.cfg.train_dataloader.get("num_workers", 0))
        val_size = int(self.cfg.val_dataloader.get("batch_size", 1))
        runner = hooks.RunnerAdapter(
            model=self.model,
            cfg=self.cfg,
            optim_wrapper=optim_wrapper,
            param_schedulers=self.iter_schedulers + self.epoch_schedulers,
            train_loader=hooks.LoaderView(self.train_set, self.batch_size, workers, epoch_len),
            val_loader=hooks.LoaderView(self.val_set, val_size, 0, -(-len(self.val_set) // val_size)),
            max_iters=max_iters,
            max_epochs=max_epochs,
            rank=self.rank,
            world_size=self.context.distributed.get_size(),
            seed=self.seed,
            work_dir=str(self.cfg.get("work_dir") or "."),
            stop=lambda: self.context.set_stop_requested(True),
        )
        hook_set = hooks.HookSet(built, runner, by_epoch)
        switches = [h for _, h in built if hooks.changes_data(h)]
        self.loader_hooks = hooks.LoaderHooks(switches, runner, by_epoch, in_process=workers == 0)
        if workers == 0:
            hook_set.loader_side = switches
        hook_set.call("before_run")
        if self.runner_checkpoint is not None:
            self._continue_runner_checkpoint(hook_set, self.runner_checkpoint)
        elif self.loaded_from:
            state = {k: v.detach().clone() for k, v in checkpoint.unwrap(self.model).state_dict().items()}
            hook_set.load_checkpoint({"meta": {}, "state_dict": state}, self.model, resume=False)
        return hook_set

    def _compiled(self, step, options: Any):
        """``compile`` as the Runner applies it: ``torch.compile`` (True, or a dict of its options) on the step
        the Runner compiles (``train_step``), here the part before Determined's backward and optimizer step."""
        if options is None or options is False:
            return step
        if options is True:
            options = {}
        if not isinstance(options, dict):
            raise UserError(f"compile={options!r}: True, False or a dict of torch.compile options")
        known = set(inspect.signature(torch.compile).parameters) - {"model"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(f"compile: {', '.join(unknown)} not options of torch.compile ({', '.join(sorted(known))})")
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "torch's defaults"
        self.startup_notes.append(f"compile: torch.compile on each batch's forward and losses ({shown})")
        return torch.compile(step, **dict(options))

    def _continue_runner_checkpoint(self, hook_set: hooks.HookSet, saved: dict[str, Any]) -> None:
        """``resume=True`` with ``load_from``: the state ``Runner.resume`` restores, in its order.

        Iteration and epoch, the seed the checkpoint was trained with, the MessageHub, the weights through
        the hooks' ``after_load_checkpoint`` (EMAHook swaps its averaged weights back), the optimizer (and
        AmpOptimWrapper's loss scale), the schedulers. Determined then starts its batch count at ``iter``.
        """
        meta = saved["meta"]
        runner = hook_set.runner
        runner.iter, runner.epoch = int(meta["iter"]), int(meta["epoch"])
        if meta.get("seed") is not None and int(meta["seed"]) != self.seed:
            # The Runner re-seeds with the checkpoint's seed; here the sampler's order follows it too.
            self.seed, self.seed_source = int(meta["seed"]), "the resumed checkpoint's seed, as Runner.resume takes it"
            seed_everything(self.seed + self.rank if self._diff_rank_seed else self.seed)
        runner.seed = self.seed
        runner.message_hub.load_state_dict(saved["message_hub"])
        checkpoint_copy = {k: v for k, v in saved.items() if k not in ("optimizer", "param_schedulers", "message_hub")}
        checkpoint_copy["state_dict"] = {k.removeprefix("module."): v for k, v in saved["state_dict"].items()}
        try:
            hook_set.load_checkpoint(checkpoint_copy, self.model, resume=True)
        except RuntimeError as e:  # load_state_dict: other architecture
            first = str(e).strip().splitlines()[0][:200]
            raise UserError(f"load_from: {self.loaded_from}: resume=True needs the same model ({first})") from None
        optimizer_state = dict(saved["optimizer"])
        loss_scale = optimizer_state.pop("loss_scaler", None)
        self.optimizer.load_state_dict(optimizer_state)
        if loss_scale is not None and self.scaler is not None:
            self.scaler.load_state_dict(loss_scale)
        states = saved.get("param_schedulers") or []
        if len(states) != len(self.schedulers):
            raise UserError(
                f"load_from: {self.loaded_from} has {len(states)} param_scheduler states, the config "
                f"{len(self.schedulers)}: resume=True needs the same param_scheduler"
            )
        for scheduler, state in zip(self.schedulers, states, strict=True):
            scheduler.load_state_dict(state)
        self.continues_at = runner.iter
        self.startup_notes.append(
            f"resume=True: continues mmengine's Runner checkpoint {self.loaded_from} at iteration {runner.iter} "
            f"(epoch {runner.epoch}): optimizer, schedulers, hooks' state and MessageHub restored"
        )

    def _build_evaluator(self, cfg):
        from mmengine.evaluator import Evaluator

        from det_mmdet import coco

        backend = (self.context.get_experiment_config().get("data") or {}).get("coco_backend", coco.DEFAULT_BACKEND)
        with logs.chatter():  # metrics read their annotation files with pycocotools
            evaluator = Evaluator(coco.with_backend(cfg.val_evaluator, backend))
        evaluator.dataset_meta = self.val_set.metainfo
        return evaluator

    # ---- Determined hooks ----------------------------------------------------------------------

    def _summary(self, model: torch.nn.Module, slots: int, epoch_len: int, plan: Schedule | None) -> list[str]:
        """What this run will do, in a few lines (the start of every run's log)."""
        params = sum(p.numel() for p in model.parameters())
        shown = ", ".join(self.classes[:8]) + (f", ... ({len(self.classes)})" if len(self.classes) > 8 else "")
        runner = self.hooks.runner
        lines = [
            f"config: {self.cfg.filename}",
            f"model: {self.cfg.model.get('type')}, {params / 1e6:.2f} M parameters; classes: {shown or 'none listed'}",
            f"data: {len(self.train_set)} training / {len(self.val_set)} validation images; {slots} slot(s) x "
            f"{self.batch_size} images per batch, {epoch_len} batches per epoch",
            f"length: {runner.max_iters} batches ({runner.max_epochs} epoch{'s' if runner.max_epochs != 1 else ''})",
            f"weights: {self.loaded_from or 'initialised by the config (no load_from)'}",
            f"seed: {self.seed} ({self.seed_source})"
            + (", + rank for each process's random state (randomness.diff_rank_seed)" if self._diff_rank_seed else ""),
            f"hooks: {', '.join(self.hooks.names)}",
            f"validation: {', '.join(describe_metric(m) for m in self.reducer.evaluator.metrics)}",
            *self.startup_notes,
        ]
        if plan is not None and plan.validation_period is not None:
            unit = "epochs" if isinstance(plan.validation_period, pytorch.Epoch) else "batches"
            value = plan.validation_period.value
            when = f"every {value} {unit}" if isinstance(value, int) else value.describe(unit)
            lines[3] += f", validation {when}"
        return lines

    def final_report(self) -> None:
        """After training, on the chief: the COCO table of the last validation (each one logs a line)."""
        if self.rank == 0:
            logs.print_table("COCO evaluation at the last validation:", self.reducer.last_table)

    def build_training_data_loader(self) -> pytorch.DataLoader:
        at_epoch = self.loader_hooks.at_epoch if self.loader_hooks else None
        loader_cfg = self.cfg.train_dataloader
        return data.train_loader(self.train_set, loader_cfg, self.batch_size, self.seed, at_epoch, self.loader_env)

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        size = int(self.cfg.val_dataloader.get("batch_size", 1))
        return data.val_loader(self.val_set, self.cfg.val_dataloader, size, self.loader_env)

    def get_batch_length(self, batch: dict[str, Any]) -> int:
        return len(batch["inputs"])

    def train_batch(self, batch: dict[str, Any], epoch_idx: int, batch_idx: int) -> dict[str, Any]:
        # The Runner's order: before_* hooks (the MessageHub's iter and epoch, which data preprocessors
        # and heads read), the step, after_train_iter hooks (EMA), then ParamSchedulerHook's stepping.
        self.hooks.before_iter(epoch_idx, batch_idx, batch)
        outputs = self._step_with_retries(batch, epoch_idx, batch_idx)
        self.hooks.after_iter(batch_idx, batch, outputs)
        for scheduler in self.iter_schedulers:
            scheduler.step()
        if self.context.is_epoch_end():
            if self.hooks.by_epoch:
                self.hooks.after_epoch()
            for scheduler in self.epoch_schedulers:
                scheduler.step()
        if self.hooks.runner.iter >= self.hooks.runner.max_iters:
            if not self.hooks.by_epoch:
                self.hooks.after_epoch()  # IterBasedTrainLoop: one "epoch", ended with training
            self.hooks.finished = True
        metrics = {k: float(v) for k, v in outputs.items()}
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])  # for the next batch, as before
        return metrics

    def _step_with_retries(self, batch: dict[str, Any], epoch_idx: int, batch_idx: int) -> dict[str, torch.Tensor]:
        while True:
            try:
                return self._train_step(batch, epoch_idx, batch_idx)
            except torch.cuda.OutOfMemoryError:
                if not self.auto_batch_size or self.splits * 2 > len(batch["inputs"]):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                self.splits *= 2
                logger.warning(
                    "auto_find_batch_size: CUDA out of memory at batch %d; each batch of %d now runs in %d parts",
                    batch_idx, len(batch["inputs"]), self.splits,
                )  # fmt: skip

    def _train_step(self, batch: dict[str, Any], epoch_idx: int, batch_idx: int) -> dict[str, torch.Tensor]:
        """One optimizer step; returns the loss terms (mmengine's ``log_vars``) of the whole batch."""
        total = len(batch["inputs"])
        outputs: dict[str, torch.Tensor] = {}
        for part in split_batch(batch, self.splits):
            loss, terms = self.losses(part)
            if not self._all_finite(loss):
                detail = ", ".join(
                    f"{k}={float(v.detach() if torch.is_tensor(v) else v):.4g}" for k, v in terms.items() if k != "loss"
                )
                raise UserError(f"non-finite loss {float(loss)} at batch {batch_idx} (epoch {epoch_idx}): {detail}")
            weight = len(part["inputs"]) / total  # parts of a split batch add up to the whole batch's mean loss
            self.context.backward((self.scaler.scale(loss) if self.scaler else loss) * weight)
            for k, v in terms.items():
                value = (v.detach() if torch.is_tensor(v) else torch.tensor(float(v))) * weight
                outputs[k] = outputs[k] + value if k in outputs else value
        self.context.step_optimizer(self.optimizer, clip_grads=self._clip, scaler=self.scaler)
        if self.scaler is not None and (batch_idx + 1) % self.accumulate == 0:
            # Determined steps through a scaler from wrap_scaler but leaves its update to the trial, once
            # after each optimizer step (it skips the step between aggregation boundaries).
            self.scaler.update()
        return outputs

    def _losses(self, part: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What the Runner's ``train_step`` computes before the optimizer's update: preprocess, forward, losses."""
        with self.autocast:
            inputs = self.model.data_preprocessor(part, training=True)
            losses = self._forward_loss(inputs)
        return self.model.parse_losses(losses)

    def _forward_loss(self, inputs: dict[str, Any]) -> dict[str, Any]:
        try:
            with unsupported.explained(self.cfg):
                return self.model(**inputs, mode="loss")
        except RuntimeError as e:
            # DDP reports last step's parameters without a gradient at this step's forward.
            if "Expected to have finished reduction" not in str(e):
                raise
            raise UserError(
                "some model parameters received no gradient on more than one slot; set "
                "find_unused_parameters: true in override_mmdet_config (mmdet's key) or remove them from the model"
            ) from None

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Every slot agrees, so one bad slot stops all of them instead of hanging the others."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.context.distributed.get_size() > 1:
            finite = finite.to(self.context.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _clip(self, params) -> None:
        if not self.clip_grad:
            return
        spec = dict(self.clip_grad)
        if spec.pop("type", "norm") == "value":
            torch.nn.utils.clip_grad_value_(params, **spec)
        else:
            torch.nn.utils.clip_grad_norm_(params, **spec)

    def evaluate_batch(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        self.hooks.call("before_val_iter", batch_idx=batch_idx, data_batch=batch)
        with torch.no_grad(), self.val_autocast:
            inputs = self.model.data_preprocessor(batch, training=False)
            with unsupported.explained(self.cfg):
                outputs = self.model(**inputs, mode="predict")
        self.reducer.update(batch, outputs)
        self.hooks.call("after_val_iter", batch_idx=batch_idx, data_batch=batch, outputs=outputs)
        return {}

    def build_callbacks(self) -> dict[str, pytorch.PyTorchCallback]:
        # Pictures first: at a validation's end they draw with the validated (EMA) weights, which the
        # hooks' callback then swaps back.
        callbacks: dict[str, pytorch.PyTorchCallback] = {}
        count = int(self.context.get_hparams().get("validation_pictures", 4))
        if count > 0:
            tensorboard = self.output_dir / "tensorboard" if self.output_dir else self.context.get_tensorboard_path()
            png = self.output_dir / "vis" if self.output_dir else None
            callbacks["validation_pictures"] = pictures.ValidationPictures(self, tensorboard, png, count, self.seed)
        hook_state = hooks.HooksCallback(self.hooks, self.model, self.train_set.metainfo)
        callbacks["mmdet_hooks"] = hook_state
        callbacks["mmdet_export"] = checkpoint.ExportOnCheckpoint(self, hook_state)
        if self.output_dir is None and self.rank == 0:  # a cluster: its log gets a plain line per report
            callbacks["report_lines"] = ClusterReportLines(self)
        searcher_metric = (self.context.get_experiment_config().get("searcher") or {}).get("metric")
        if searcher_metric:
            callbacks["searcher_metric"] = SearcherMetricCheck(str(searcher_metric))
        if self.cluster_info is not None:
            runner = self.hooks.runner
            callbacks["searcher_stop"] = searcher.SearcherStop(self.context, self.cluster_info, lambda: runner.iter)
        hparams = self.context.get_hparams()
        if hparams.get("early_stopping"):
            from det_mmdet import knobs

            metric = knobs.metric_name(hparams) if hparams.get("metric_for_best_model") else "bbox_mAP"
            patience = int(hparams.get("early_stopping_patience", 3))
            callbacks["early_stopping"] = EarlyStopping(self.context, metric, patience)
        from det_mmdet import vis_backends

        callbacks.update(vis_backends.callbacks(self))  # visualizer.vis_backends: the chief's scalars, too
        return callbacks


class ClusterReportLines(pytorch.PyTorchCallback):
    """``logs.ReportLines`` as a callback: a line per training report and per validation."""

    def __init__(self, trial: MMDetTrial) -> None:
        runner = trial.hooks.runner
        self.lines = logs.ReportLines(lambda: (runner.iter, runner.max_iters))

    def on_training_workload_end(self, avg_metrics: dict[str, Any], batch_metrics: Any) -> None:
        logger.info(self.lines.line("training", avg_metrics))

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        logger.info(self.lines.line("validation", metrics))


class SearcherMetricCheck(pytorch.PyTorchCallback):
    """Every validation must report the searcher's metric, locally as on a cluster.

    On a cluster Determined's default checkpoint policy (``best``) ends the trial with a traceback
    when a validation lacks it; this says so in one line, and in local runs too, so it shows up first
    on a laptop.
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        if self.metric not in metrics:
            names = sorted(k for k in metrics if k not in ("batches", "epochs"))
            listed = [k for k in names if not re.match(r"(bbox|segm)_AP_", k)]  # per-class keys: counted
            count = len(names) - len(listed)
            shown = ", ".join(listed + ([f"{count} per-class APs"] if count else [])) or "nothing"
            raise UserError(f"validation reported no {self.metric}, the searcher's metric (it reported {shown})")


class EarlyStopping(pytorch.PyTorchCallback):
    """Ask Determined to stop (checkpoint, then exit) when ``metric`` stops improving (higher is better)."""

    def __init__(self, context: pytorch.PyTorchTrialContext, metric: str, patience: int) -> None:
        self.context, self.metric, self.patience = context, metric, patience
        self.best: float | None = None
        self.stale = 0

    def on_validation_end(self, metrics: dict[str, Any]) -> None:
        if self.metric not in metrics:
            raise UserError(f"early_stopping: validation reports no {self.metric} ({', '.join(sorted(metrics))})")
        value = float(metrics[self.metric])
        if self.best is None or value > self.best:
            self.best, self.stale = value, 0
            return
        self.stale += 1
        if self.stale >= self.patience:
            logger.info(
                "early stopping: %s has not improved on %.4f for %d validations", self.metric, self.best, self.stale
            )
            self.context.set_stop_requested(True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.stale = state_dict["best"], int(state_dict["stale"])


def check_predictable(model: torch.nn.Module) -> None:
    """Heads that mmdet trains but cannot predict with stop before training, not at the first validation.

    mmdet 3.3.0's BaseDenseHead prediction reads ``loss_cls``; SSDHead has none (the Runner fails at
    its first validation too), and Determined always validates at the end of training.
    """
    from mmdet.models.dense_heads.base_dense_head import BaseDenseHead

    for name, module in model.named_modules():
        if not isinstance(module, BaseDenseHead) or hasattr(module, "loss_cls"):
            continue
        if type(module)._predict_by_feat_single is BaseDenseHead._predict_by_feat_single:
            raise UserError(
                f"model.{name} ({type(module).__name__}) cannot be validated with this mmdet: its prediction reads "
                f"loss_cls, which {type(module).__name__} does not have (mmengine's Runner fails at its first "
                "validation too); det-mmdet validates every run, so this model is not supported"
            )


def build_detector(model_cfg: Any) -> torch.nn.Module:
    """mmdet's model from its config, with one-line errors; weights are the caller's business."""
    from mmdet.registry import MODELS

    unsupported.check_config({"model": model_cfg})  # packages its parts import, named before they fail

    try:
        model = MODELS.build(model_cfg)
    except KeyError as e:  # the registry's "X is not in the model registry"
        raise UserError(f"model: {e.args[0] if e.args else e}") from None
    except (RuntimeError, ImportError) as e:  # mmdet's optional extras: "skimage is not installed"
        found = re.search(r"(\w+) is not installed", str(e))
        name = getattr(e, "name", None) or (found.group(1) if found else None)
        if name is None:
            raise
        package = EXTRAS.get(name, name)
        raise UserError(f"{model_cfg.get('type')} needs the {package} package: pip install {package}") from None
    check_predictable(model)
    return model


def count_fields(model_cfg: Any) -> str:
    from det_mmdet.config import class_count_fields

    return ", ".join(field for field, _ in class_count_fields(model_cfg)) or "num_classes"


def check_class_counts(model_cfg: Any, classes: list[str]) -> None:
    """Every class count in the model (heads, panoptic things + stuff) against the training set's classes."""
    from det_mmdet.config import class_count_fields

    if not classes:
        return
    for field, count in class_count_fields(model_cfg):
        if count == len(classes) or (count == 1 and "rpn" in field):  # RPN: object vs background
            continue
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise UserError(
            f"{field} is {count} but the training set has {len(classes)} classes ({shown}); "
            "set data.classes_from_annotations: true or override the field"
        )


def _epoch_based(cfg) -> bool:
    train_cfg = cfg.get("train_cfg") or {}
    return "max_epochs" in train_cfg or train_cfg.get("type") == "EpochBasedTrainLoop"


def _lengths(cfg, plan, epoch_len: int) -> tuple[int, int]:
    """``(max_iters, max_epochs)`` as the Runner's loops report them, for this run's length."""
    unit = plan.max_length if plan is not None else None
    if isinstance(unit, pytorch.Batch) and isinstance(unit.value, int):
        return unit.value, -(-unit.value // epoch_len)
    if isinstance(unit, pytorch.Epoch) and isinstance(unit.value, int):
        return unit.value * epoch_len, unit.value
    train_cfg = cfg.get("train_cfg") or {}
    if train_cfg.get("max_epochs"):
        return int(train_cfg["max_epochs"]) * epoch_len, int(train_cfg["max_epochs"])
    iters = int(train_cfg.get("max_iters") or 0)
    return iters, -(-iters // epoch_len)

"""Determined entrypoint: ``python3 -m determined.launch.torch_distributed python3 train.py [options]``.

On a cluster the hyperparameters (already sampled by the searcher), the experiment config, the
trial seed and the checkpoint to continue from all come from ``det.get_cluster_info()``. Off a
cluster this is ``det-mmdet train EXPERIMENT.yaml [options]``: the same trial in local mode.

Options: --max-batches N | --max-epochs N (else the searcher's max_time, else the mmdet config's
train_cfg), --validation-period N, --checkpoint-period N, --report-period N (batches),
--set key=value (repeatable).
"""

from __future__ import annotations

import argparse
import logging
import sys

import determined as det
from determined import pytorch

from det_mmdet.cli import add_schedule_args, setup_logging
from det_mmdet.cli import main as local_main
from det_mmdet.config import build_config, experiment_for_trial, parse_set
from det_mmdet.environment import cluster_process_group
from det_mmdet.errors import UserError, one_line
from det_mmdet.knobs import with_global_batch_size
from det_mmdet.runner import aggregation_frequency, fit, schedule
from det_mmdet.trial import MMDetTrial


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MMDetTrial on a Determined cluster")
    add_schedule_args(p)
    return p.parse_args(argv)


def train_on_cluster(info: det.ClusterInfo, args: argparse.Namespace) -> None:
    exp_conf = dict(info.trial._config)
    exp = experiment_for_trial(exp_conf, info.trial.hparams)
    cfg = build_config(exp, parse_set(args.set))
    plan = schedule(
        cfg,
        exp_conf,
        args.max_batches,
        args.max_epochs,
        args.validation_period,
        args.checkpoint_period,
        args.report_period,
    )
    accumulate = aggregation_frequency(cfg)
    slots = int((exp_conf.get("resources") or {}).get("slots_per_trial") or 1)
    hparams = with_global_batch_size(info.trial.hparams, slots)
    group = cluster_process_group((cfg.get("env_cfg") or {}).get("dist_cfg"))  # Determined starts it
    with pytorch.init(hparams=hparams, exp_conf=exp_conf, aggregation_frequency=accumulate) as context:
        if context.distributed.get_size() > 1 and context.distributed.get_rank() == 0:
            logging.getLogger("det_mmdet").info("env_cfg: %s", group)
        trial = MMDetTrial(context, cfg, plan)
        fit(trial, context, plan, latest_checkpoint=info.latest_checkpoint)


def main() -> int:
    info = det.get_cluster_info()
    if info is None or info.task_type != "TRIAL":
        return local_main(["train", *sys.argv[1:]])
    setup_logging()
    try:
        train_on_cluster(info, parse_args(sys.argv[1:]))
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

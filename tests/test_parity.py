"""A laptop run is the cluster's run: the entrypoint's arguments, Determined's epoch length, the seed."""

from __future__ import annotations

import pytest
import yaml

from conftest import ROOT, det_mmdet, read_metrics, shapes_hparams, write_experiment
from det_mmdet.cli import apply_entrypoint_args, build_parser
from det_mmdet.errors import UserError
from det_mmdet.trial import choose_seed, epoch_length

ENTRY = "python3 -m determined.launch.torch_distributed python3 train.py"


def parsed(*argv: str):
    return build_parser().parse_args(["train", "exp.yaml", *argv])


def test_entrypoint_arguments_apply_and_the_command_line_wins():
    conf = {"entrypoint": f"{ENTRY} --max-batches 1200 --validation-period 400 --set a.b=1"}
    args = parsed("--validation-period", "50", "--set", "a.b=2")
    line = apply_entrypoint_args(args, conf, "exp.yaml")
    assert (args.max_batches, args.validation_period, args.report_period) == (1200, 50, None)
    assert args.set == ["a.b=1", "a.b=2"]  # the command line's --set is applied last
    assert line == (
        "entrypoint arguments applied, as on a cluster: --max-batches 1200 --set a.b=1 "
        "(the command line's --validation-period win)"
    )
    args = parsed("--max-epochs", "3")  # one length only: the command line's
    apply_entrypoint_args(args, conf, "exp.yaml")
    assert (args.max_batches, args.max_epochs) == (None, 3)


def test_entrypoint_without_arguments_or_with_unknown_ones():
    args = parsed()
    assert apply_entrypoint_args(args, {"entrypoint": ENTRY}, "exp.yaml") == ""
    assert apply_entrypoint_args(args, {"entrypoint": "model_def:MMDetTrial"}, "exp.yaml") == ""
    with pytest.raises(UserError, match="train.py does not take '--epochs 3'"):
        apply_entrypoint_args(args, {"entrypoint": f"{ENTRY} --epochs 3"}, "exp.yaml")


def test_shipped_entrypoints_parse():
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        args = parsed()
        apply_entrypoint_args(args, yaml.safe_load(path.read_text()), path.name)
    args = parsed()
    apply_entrypoint_args(args, yaml.safe_load((ROOT / "experiments" / "search_asha.yaml").read_text()), "asha")
    assert args.validation_period == 2000


def test_det_mmdet_train_runs_the_entrypoint_schedule(tmp_path, shapes):
    exp = write_experiment(
        tmp_path, shapes_hparams(shapes), entrypoint=f"{ENTRY} --max-batches 4 --validation-period 2 --report-period 2"
    )
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "entrypoint arguments applied, as on a cluster: --max-batches 4 --validation-period 2" in r.stderr
    records = read_metrics(tmp_path / "out")
    assert [x["batches"] for x in records if x["group"] == "validation"] == [2, 4]
    assert [x["batches"] for x in records if x["group"] == "training"] == [2, 4]


@pytest.mark.parametrize("images, batch, slots", [(48, 4, 1), (48, 4, 5), (50, 4, 2), (7, 2, 3), (3, 4, 2)])
def test_epoch_length_is_the_chief_sampler_length(images, batch, slots):
    import torch
    from determined.pytorch.samplers import DistributedBatchSampler

    batches = torch.utils.data.BatchSampler(range(images), batch, drop_last=False)
    chief = DistributedBatchSampler(batches, num_workers=slots, rank=0)
    assert epoch_length(images, batch, slots) == len(chief)


def test_the_config_seed_wins_everywhere():
    assert choose_seed(7, None)[0] == 7 and choose_seed(7, 12345)[0] == 7
    assert choose_seed(None, 12345)[0] == 12345  # a cluster trial without randomness.seed
    assert choose_seed(None, None)[0] == 0

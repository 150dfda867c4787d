"""The loader config keys mmengine's Runner passes to torch's DataLoader: honoured, or refused in one line."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
from mmengine.dataset import default_collate
from mmengine.registry import FUNCTIONS

from conftest import ROOT
from det_mmdet import data
from det_mmdet.errors import UserError


class Numbers(torch.utils.data.Dataset):
    """Items say which process made them and what the worker's init left in the environment."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {"i": i, "pid": os.getpid(), "mark": os.environ.get("DET_MMDET_TEST_MARK", "")}


@FUNCTIONS.register_module()
def mark_worker(worker_id: int, value: str) -> None:
    os.environ["DET_MMDET_TEST_MARK"] = f"{value}{worker_id}"


def batches(cfg: dict) -> list:
    loader = data.train_loader(Numbers(), cfg, batch_size=4, seed=0)
    return list(loader.get_data_loader(repeat=False, skip=0, num_replicas=1, rank=0))


def test_every_key_the_runner_passes_on_is_classified():
    """torch's DataLoader arguments and the keys Runner.build_dataloader reads itself."""
    torch_keys = set(inspect.signature(torch.utils.data.DataLoader).parameters)
    runner_keys = {"num_batch_per_epoch", "disable_subprocess_warning", "collate_fn", "worker_init_fn"}
    classified = set(data.LOADER_KEYS) | set(data.REFUSED_LOADER_KEYS)
    assert torch_keys | runner_keys <= classified
    assert not set(data.LOADER_KEYS) & set(data.REFUSED_LOADER_KEYS)


def test_collate_fn_worker_init_fn_prefetch_and_timeout_are_honoured():
    cfg = dict(num_workers=1, prefetch_factor=3, timeout=30, collate_fn=dict(type="default_collate"))
    cfg |= dict(worker_init_fn=dict(type="mark_worker", value="w"), multiprocessing_context="fork")
    loader = data.train_loader(Numbers(), cfg, batch_size=4, seed=0)
    torch_loader = loader.get_data_loader(repeat=False, skip=0, num_replicas=1, rank=0)
    assert (torch_loader.prefetch_factor, torch_loader.timeout) == (3, 30.0)
    assert torch_loader.collate_fn is default_collate
    got = list(torch_loader)
    assert all(isinstance(b["i"], torch.Tensor) for b in got)  # default_collate stacks; pseudo_collate would not
    assert {m for b in got for m in b["mark"]} == {"w0"}  # the config's worker_init_fn ran in the worker
    assert sorted(i for b in got for i in b["i"].tolist()) == list(range(8))


def test_the_default_is_pseudo_collate_in_the_main_process():
    got = batches({})
    assert isinstance(got[0]["i"], list) and {p for b in got for p in b["pid"]} == {os.getpid()}


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"num_batch_per_epoch": 2}, "train_dataloader.num_batch_per_epoch is not supported: Determined's searcher"),
        ({"drop_last": True}, "train_dataloader.drop_last=True is not supported"),
        ({"shuffle": True}, "train_dataloader.shuffle is not supported: use sampler.shuffle"),
        ({"num_wokers": 2}, "train_dataloader.num_wokers: unknown DataLoader key; allowed: dataset,"),
        ({"collate_fn": dict(type="no_such_collate")}, "train_dataloader.collate_fn.type 'no_such_collate' is not"),
        ({"multiprocessing_context": "thread"}, "train_dataloader.multiprocessing_context 'thread': choose fork"),
    ],
)
def test_what_cannot_be_honoured_is_one_line(cfg, message):
    with pytest.raises(UserError) as e:
        batches(cfg)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_loader_workers_bench_runs_both_loaders():
    """A miniature bench/loader_workers.py: the Runner's loader and ours, 0 and 1 workers."""
    cmd = [sys.executable, "bench/loader_workers.py", "--images", "8", "--workers", "0", "1", "--repeat", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "| loader |" not in line]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("mmengine Runner.build_dataloader", "0"),
        ("det-mmdet data.train_loader", "0"),
        ("mmengine Runner.build_dataloader", "1"),
        ("det-mmdet data.train_loader", "1"),
    ]
    assert all(float(r[3]) > 0 for r in rows)

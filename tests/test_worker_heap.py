"""det_mmdet.worker_heap: loader workers keep the memory they free (glibc), so the next sample's big
arrays do not come back as fresh pages."""

from __future__ import annotations

import resource

import numpy as np
import pytest
import torch

from det_mmdet import data, environment, worker_heap
from det_mmdet.errors import UserError

MB = 1 << 20


class BigArrays(torch.utils.data.Dataset):
    """Each item makes and frees four 6 MB arrays (as a mosaic pipeline's copies do) and returns the page
    faults that took: 6,144 where every array comes as fresh pages."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        arrays = [np.ones(6 * MB, np.uint8) for _ in range(4)]
        del arrays
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def faults_per_item(reuse_heap: bool) -> list[int]:
    # spawn: a fresh worker, with glibc's thresholds as they start (a forked one inherits this process's,
    # which the tests before have moved)
    env = environment.LoaderEnv("spawn", None, reuse_heap=reuse_heap)
    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(6)), 1, drop_last=False)
    loader = data._loader(BigArrays(), {"num_workers": 1}, batches, seed=0, env=env)
    torch_loader = loader.get_data_loader(repeat=False, skip=0, num_replicas=1, rank=0)
    return [x for batch in torch_loader for x in batch]


@pytest.mark.skipif(not worker_heap.available(), reason="the heap settings are glibc's")
def test_workers_reuse_what_they_free():
    kept, default = faults_per_item(True)[1:], faults_per_item(False)[1:]  # after each worker's first item
    assert max(kept) < 200, kept
    # glibc's own thresholds give back the top of the heap beyond twice the largest block: 2 of 4 arrays fresh
    assert min(default) > 1500, default


def test_the_knob_must_be_a_boolean_and_says_what_it_does():
    from det_mmdet.config import build_config, experiment_from_dict

    exp = experiment_from_dict(
        {
            "hyperparameters": {"global_batch_size": 2, "config_file": "configs/shapes_faster_rcnn.py"},
            "data": {"reuse_worker_heap": "yes"},
        }
    )
    with pytest.raises(UserError, match=r"^data.reuse_worker_heap: 'yes' is not true or false$"):
        build_config(exp)
    assert (
        worker_heap.startup_line(False) == "loader workers: glibc's own heap thresholds (data.reuse_worker_heap: false)"
    )
    if worker_heap.available():
        assert "heap blocks under 32 MB, up to 64 MB free kept" in worker_heap.startup_line(True)

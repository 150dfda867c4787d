"""Survive kill -9 and a faulty object store: real signals, a real proxy, real servers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import torch

from conftest import DET_MMDET, ROOT, det_mmdet, read_metrics, shapes_hparams, write_experiment
from det_mmdet.checkpoint import is_complete, newest_checkpoint, steps_completed
from object_stores import S3_ENV, Proxy, moto_server, upload_s3


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(newest_checkpoint(run_dir / "checkpoints") / "model.pth", weights_only=True)["state_dict"]


def test_a_checkpoint_still_being_written_is_not_read(tmp_path):
    """A local run writes under ``.partial-<id>`` and renames; a reader polling meanwhile (``--resume``
    after a kill, this file's kill test) must skip the half-written one, not parse its empty metadata."""
    checkpoints = tmp_path / "checkpoints"
    for name, metadata in (("a", '{"steps_completed": 4}'), (".partial-b", "")):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "state_dict.pth").write_bytes(b"")
        (checkpoints / name / "metadata.json").write_text(metadata)
    assert newest_checkpoint(checkpoints) == checkpoints / "a"
    assert not is_complete(checkpoints / ".partial-b")


def test_kill_9_then_resume_reaches_the_same_weights(tmp_path, shapes):
    exp = write_experiment(tmp_path, shapes_hparams(shapes))
    common = ["--max-batches", 16, "--checkpoint-period", 2, "--validation-period", 16]
    full = det_mmdet("train", exp, "--output-dir", tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen([str(DET_MMDET), "train", str(exp), "--output-dir", str(killed), *map(str, common)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    # Wait for a checkpoint past batch 4, then a random moment more (possibly mid-checkpoint): SIGKILL.
    deadline = time.time() + 300
    while time.time() < deadline:
        done = newest_checkpoint(killed / "checkpoints") if (killed / "checkpoints").is_dir() else None
        if done is not None and steps_completed(done) >= 4:
            break
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0, 0.5))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    survivors = [d for d in (killed / "checkpoints").iterdir() if d.is_dir() and not d.name.startswith(".partial-")]
    assert survivors and all(is_complete(d) for d in survivors)  # nothing half-written under a real name

    resumed = det_mmdet("train", exp, "--output-dir", killed, *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from batch" in resumed.stderr
    assert not list((killed / "checkpoints").glob(".partial-*"))
    assert [x["batches"] for x in read_metrics(killed) if x["group"] == "validation"][-1] == 16
    a, b = weights(tmp_path / "full"), weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_faulty_store_every_image_read_once_and_retries_logged(tmp_path, shapes):
    rng = random.Random(0)
    faults = {"503": 0, "slow": 0, "drop": 0}

    def rule(method: str, path: str, seen: int):
        if method != "GET" or not path.endswith(".jpg"):
            return None
        roll = rng.random()  # about one image request in four fails, in one of three ways
        if roll < 0.09:
            faults["503"] += 1
            return 503
        if roll < 0.17:
            faults["drop"] += 1
            return "drop"
        if roll < 0.25:
            faults["slow"] += 1
            time.sleep(0.3)  # slow, but answered
        return None

    with moto_server(tmp_path / "moto.log") as s3:
        env = {**S3_ENV, "AWS_ENDPOINT_URL": s3, "XDG_CACHE_HOME": str(tmp_path / "cache")}
        os.environ.update(env)
        try:
            upload_s3(s3, "faulty", shapes, "shapes/")
        finally:
            for key in env:
                os.environ.pop(key, None)
        hparams = shapes_hparams(shapes)
        hparams["override_mmdet_config"]["data_root"] = "shapes/"
        hparams["validation_pictures"] = 0  # the training and validation reads only: pictures read 4 images again
        exp = write_experiment(tmp_path, hparams, data={"file_client_args": {
            "backend": "s3", "bucket_name": "faulty", "backoff_s": 0.01}})  # fmt: skip
        with Proxy(s3, rule) as proxy:
            r = det_mmdet(
                "train",
                exp,
                "--output-dir",
                tmp_path / "out",
                "--max-batches",
                12,
                env={**env, "AWS_ENDPOINT_URL": proxy.url},
            )
    assert r.returncode == 0, r.stderr[-3000:]
    served = {p: n for (m, p), n in proxy.served.items() if m == "GET" and p.endswith(".jpg")}
    assert len(served) == 64 and set(served.values()) == {1}  # one epoch + validation: each image once
    assert faults["503"] and faults["drop"] and faults["slow"]
    retries = r.stderr.count("; retry ")
    assert retries == faults["503"] + faults["drop"], (retries, faults)

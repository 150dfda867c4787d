"""Every config key mmengine's Runner reads is classified (det_mmdet/runner_keys.py), and each means it."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap

import pytest
import torch

from conftest import ROOT, det_mmdet, read_metrics, shapes_hparams, write_experiment
from det_mmdet import runner_keys


def source_keys(code, name: str) -> set[str]:
    """``name.get('key')`` and ``name['key']`` (``name`` or ``self.name``) in a function's or class's source."""

    def named(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id == name) or (
            isinstance(node, ast.Attribute) and node.attr == name
        )

    tree = ast.parse(textwrap.dedent(inspect.getsource(code)))
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            if named(node.func.value) and node.args and isinstance(node.args[0], ast.Constant):
                keys.add(node.args[0].value)
        if isinstance(node, ast.Subscript) and named(node.value) and isinstance(node.slice, ast.Constant):
            keys.add(node.slice.value)
    return keys


def params(function, skip: tuple[str, ...] = ("self", "runner", "dataloader", "evaluator")) -> set[str]:
    return {p for p in inspect.signature(function).parameters if p not in skip and not p.startswith("*")}


def mmengine_keys() -> dict[str, set[str]]:
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop, Runner, ValLoop
    from mmengine.runner.log_processor import LogProcessor
    from mmengine.utils.dl_utils import set_multi_processing
    from mmengine.visualization import Visualizer

    defaults = re.search(r"default_hooks = dict\((.*?)\)\n", inspect.getsource(Runner.register_default_hooks), re.S)
    loop_keys = params(EpochBasedTrainLoop.__init__) | params(IterBasedTrainLoop.__init__)
    return {
        "": source_keys(Runner, "cfg"),  # from_cfg, and self.cfg where the Runner reads it later (compile)
        "train_cfg": loop_keys | {"type", "by_epoch"},
        "val_cfg": params(ValLoop.__init__) | {"type"},
        "optim_wrapper": params(OptimWrapper.__init__, ("self", "optimizer", "kwargs"))
        | params(AmpOptimWrapper.__init__, ("self", "kwargs"))
        | {"type", "optimizer", "paramwise_cfg", "constructor"},
        "env_cfg": source_keys(Runner.setup_env, "env_cfg"),
        "mp_cfg": params(set_multi_processing, ("distributed",)),
        "randomness": params(Runner.set_randomness),
        "default_hooks": set(re.findall(r"(\w+)=dict\(type=", defaults.group(1))),
        "visualizer": params(Visualizer.__init__) | {"type"},
        "log_processor": params(LogProcessor.__init__, ("self", "kwargs")) | {"type"},
    }


def test_every_key_the_runner_reads_is_classified():
    keys = mmengine_keys()
    assert {"model", "auto_scale_lr", "compile", "env_cfg", "visualizer"} <= keys[""]  # the parse found them
    unclassified = {section: sorted(found - set(runner_keys.TOP if section == "" else known(section)))
                    for section, found in keys.items()}  # fmt: skip
    assert all(not v for v in unclassified.values()), unclassified


def known(section: str) -> dict:
    if section == "mp_cfg":
        return {"mp_start_method": 1, "opencv_num_threads": 1}
    return runner_keys.SECTIONS[section]


def test_readme_table_lists_every_key():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### mmdet config keys") :]
    for key, (status, _) in runner_keys.TOP.items():
        assert f"| `{key}` | {status} |" in table, key
    for section, keys in runner_keys.SECTIONS.items():
        for key, (status, _) in keys.items():
            assert f"| `{section}.{key}` | {status} |" in table, f"{section}.{key}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"compile": {"fullgraph": True, "speed": 2}}, "error: compile: speed not options of torch.compile"),
        (
            {"resume": True},
            "error: resume=True without load_from: the Runner would look for the newest checkpoint in work_dir",
        ),
        ({"optim_wrapper.use_fsdp": True}, "error: optim_wrapper.use_fsdp=True is not supported by det-mmdet"),
        ({"env_cfg.mp_cfg.mp_start_method": "thread"}, "error: env_cfg.mp_cfg.mp_start_method 'thread': choose"),
        ({"env_cfg.dist_cfg.init_method": "tcp://x:1"}, "error: env_cfg.dist_cfg: init_method not supported"),
        ({"env_cfg.dist_cfg.backend": "mpi"}, "error: env_cfg.dist_cfg.backend 'mpi': choose nccl, gloo"),
    ],
)
def test_a_key_the_trial_cannot_honour_is_one_line(tmp_path, shapes, override, message):
    exp = write_experiment(tmp_path, shapes_hparams(shapes, **override))
    r = det_mmdet("train", exp, "--output-dir", tmp_path / "out", "--max-batches", 1)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


def first_lr(tmp_path, shapes, name: str, **overrides) -> tuple[float, str]:
    exp = write_experiment(tmp_path, shapes_hparams(shapes, **overrides), name=f"{name}.yaml")
    out = tmp_path / name
    r = det_mmdet("train", exp, "--output-dir", out, "--max-batches", 1, "--report-period", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    (report,) = [x for x in read_metrics(out) if x["group"] == "training"]
    return report["metrics"]["lr"], r.stderr


def test_auto_scale_lr_scales_every_group_before_the_schedulers(tmp_path, shapes):
    plain, _ = first_lr(tmp_path, shapes, "plain")
    scaled, log = first_lr(tmp_path, shapes, "scaled", auto_scale_lr={"enable": True, "base_batch_size": 2})
    assert scaled == pytest.approx(2 * plain, rel=1e-6)  # global batch 4 over 2, warm-up factor kept
    assert "auto_scale_lr: lr x 2 (global batch 4 / base_batch_size 2)" in log
    off, _ = first_lr(tmp_path, shapes, "off", auto_scale_lr={"enable": False, "base_batch_size": 2})
    assert off == plain


def first_losses(tmp_path, shapes, name: str, env: dict | None = None, **overrides) -> tuple[dict, str]:
    exp = write_experiment(tmp_path, shapes_hparams(shapes, **overrides), name=f"{name}.yaml")
    out = tmp_path / name
    r = det_mmdet("train", exp, "--output-dir", out, "--max-batches", 2, "--report-period", 1, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [x["metrics"] for x in read_metrics(out) if x["group"] == "training"], r.stderr


def test_compile_runs_each_step_through_torch_compile(tmp_path, shapes):
    """compile=dict(...) is torch.compile's options, as under the Runner; dynamo's log shows the step traced."""
    plain, _ = first_losses(tmp_path, shapes, "plain")
    traced = {"TORCH_LOGS": "+dynamo"}
    compiled, log = first_losses(tmp_path, shapes, "compiled", env=traced, compile={"backend": "eager"})
    assert "compile: torch.compile on each batch's forward and losses (backend='eager')" in log
    assert "torchdynamo start tracing _losses" in log
    assert len(compiled) == len(plain) == 2
    for ours, theirs in zip(compiled, plain, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-5)


def test_replaced_keys_are_named_at_start_up(tmp_path, shapes):
    _, log = first_lr(tmp_path, shapes, "named", launcher="pytorch", **{"env_cfg.cudnn_benchmark": True})
    assert "replaced by Determined: launcher (Determined's launcher" in log
    assert "env_cfg: cudnn.benchmark on" in log


class ThreadCount(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        import cv2

        return cv2.getNumThreads()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_mp_cfg_reaches_every_loader_worker(method):
    from det_mmdet import data, environment

    loader_env, lines = environment.apply({"mp_cfg": {"mp_start_method": method, "opencv_num_threads": 1}}, 1)
    assert f"loader workers: start method {method}, OpenCV threads 1" in lines
    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(4)), 1, drop_last=False)
    loader = data._loader(ThreadCount(), {"num_workers": 2}, batches, seed=0, env=loader_env)
    torch_loader = loader.get_data_loader(repeat=False, skip=0, num_replicas=1, rank=0)
    assert torch_loader.multiprocessing_context.get_start_method() == method
    assert [x for batch in torch_loader for x in batch] == [1, 1, 1, 1]


def test_on_a_cluster_the_process_group_is_determineds():
    """Determined 0.38.1's pytorch.init starts the group itself: dist_cfg may only agree with it there."""
    from det_mmdet import environment
    from det_mmdet.errors import UserError

    line = environment.cluster_process_group({"backend": "nccl"})  # mmdet's default_runtime, on a CPU machine
    assert line == "process group: gloo, started by Determined (dist_cfg.backend nccl needs GPUs: none here)"
    with pytest.raises(UserError, match=r"^env_cfg.dist_cfg.timeout: on a Determined cluster pytorch.init starts"):
        environment.cluster_process_group({"backend": "nccl", "timeout": 60})

"""``det-mmdet check EXPERIMENT.yaml``: what can be known before ``det experiment create``.

A config error found on a cluster costs a trial start and ``max_restarts`` retries; most of them can
be found in seconds here. For every point the searcher may sample that changes the config (each
categorical choice, both bounds of every range, the rest at their local values) this resolves the
config as the trial will, builds the model (no weights fetched) and checks its class counts; it checks
that validation reports the searcher's metric and ``time_metric``; and every path the trial reads is
looked up from where the trial will run: relative ones in the context directory (``model_def/``,
minus ``.detignore``), absolute ones under a bind mount or the image, buckets named as not
checkable here. Each finding is a line; problems are ``error:`` lines and exit status 2.
"""

from __future__ import annotations

import copy
import itertools
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from det_mmdet.config import CONTEXT_DIR, SEARCH_TYPES, Experiment, build_config, load_experiment, locate
from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")

# Keys each mmdet evaluator reports (CocoMetric's prefixes per metric kind); the controller adds the rest.
COCO_KEYS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
ALWAYS_REPORTED = ("batches", "epochs", "val_images")
# The parts of an mmdet config whose files a trial reads.
TRIAL_READS = ("train_dataloader", "val_dataloader", "val_evaluator")


# ---- the searcher's sample points ------------------------------------------------------------------


def _spaces(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    if isinstance(node, dict):
        if node.get("type") in SEARCH_TYPES:
            yield path, node
        elif "type" not in node:
            for key, value in node.items():
                yield from _spaces(value, (*path, str(key)))


def _local_value(space: dict[str, Any]) -> Any:
    from det_mmdet.config import resolve_search_spaces

    return resolve_search_spaces(space, "", [])


def _choices(space: dict[str, Any]) -> list[tuple[str, Any]]:
    """The values worth building for one search space: every category, both ends of a range."""
    kind = space["type"]
    if kind == "categorical":
        return [(repr(v), v) for v in space["vals"]]
    if kind in ("int", "double"):
        cast = int if kind == "int" else float
        return [(f"{cast(space[k])}", cast(space[k])) for k in ("minval", "maxval")]
    if kind == "log":
        base = float(space.get("base", 10))
        return [(f"{base:g}^{space[k]}", base ** float(space[k])) for k in ("minval", "maxval")]
    return []


def _with(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(tree)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = copy.deepcopy(value)
    return out


def sample_points(hparams: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, hyperparameters as the master hands them)``: the local values, then one search space
    at a time moved to each of its categories or range ends."""
    spaces = list(_spaces(hparams))
    base = copy.deepcopy(hparams)
    for path, space in spaces:
        base = _with(base, path, _local_value(space))
    points = [("the local values", base)]
    for path, space in spaces:
        for label, value in _choices(space):
            point = _with(base, path, value)
            if point != base:
                points.append((f"{'.'.join(path)}={label}", point))
    return points


# ---- where the trial reads from ---------------------------------------------------------------------


def _ignored(context: Path) -> Any:
    import warnings

    import pathspec  # read as Determined's CLI reads .detignore (determined/common/detignore.py)

    lines = (context / ".detignore").read_text().splitlines() if (context / ".detignore").is_file() else []
    with warnings.catch_warnings():  # newer pathspec deprecates the pattern class Determined uses
        warnings.simplefilter("ignore", DeprecationWarning)
        return pathspec.PathSpec.from_lines(pathspec.patterns.GitWildMatchPattern, lines)


def _dataset_paths(node: Any, where: str = "") -> Iterator[tuple[str, str, bool]]:
    """``(config key, path, is_dir)`` of every annotation file and image folder of every dataset."""
    if isinstance(node, dict):
        if "ann_file" in node or "data_prefix" in node:
            root = str(node.get("data_root") or "")
            ann = str(node.get("ann_file") or "")
            if ann:
                yield f"{where}.ann_file", _join(root, ann), False
            for key, prefix in (node.get("data_prefix") or {}).items():
                if prefix:
                    yield f"{where}.data_prefix.{key}", _join(root, str(prefix)), True
        for key, value in node.items():
            if key not in ("pipeline", "model"):
                yield from _dataset_paths(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _dataset_paths(value, f"{where}[{i}]")


def _join(root: str, path: str) -> str:
    if "://" in path or path.startswith("/") or not root:
        return path
    return root.rstrip("/") + "/" + path


def where_from(
    key: str, path: str, is_dir: bool, mounts: list[dict[str, Any]], ignored: Any, context: Path = CONTEXT_DIR
) -> tuple[bool, str]:
    """``(ok, line)`` for one path as the trial will see it."""
    if "://" in path:
        return True, f"not checkable here: {key} {path} (a bucket: read with the trial's credentials on the cluster)"
    if path.startswith("/"):
        for mount in mounts:
            inside = str(mount.get("container_path", "")).rstrip("/")
            if path == inside or path.startswith(inside + "/"):
                host = str(mount["host_path"]).rstrip("/") + path[len(inside) :]
                return True, f"not checkable here: {key} {path} (bind mount of {host} on the agents)"
        return True, f"not checkable here: {key} {path} (absolute: must exist in the image or on every agent)"
    local = context / path
    rel = Path(path).as_posix().rstrip("/") + ("/" if is_dir else "")
    if ignored.match_file(rel):
        return False, (
            f"{key} {path}: relative, so the trial reads it from the context directory {context.name}/, but "
            f"{context.name}/.detignore leaves it out of the upload; use a bind mount, a bucket or an absolute path"
        )
    if not local.exists():
        return False, (
            f"{key} {path}: relative, so the trial reads it from the context directory {context.name}/, where it "
            "does not exist; use a bind mount, a bucket or an absolute path"
        )
    return True, f"ok: {key} {path} (in the context directory)"


# ---- one sample point ---------------------------------------------------------------------------------


def reported_keys(cfg) -> list[str] | None:
    """What validation will report, or None where an evaluator's keys are not known here."""
    specs = cfg.get("val_evaluator") or []
    specs = [specs] if isinstance(specs, dict) else list(specs)
    keys = list(ALWAYS_REPORTED)
    for spec in specs:
        kind = str(spec.get("type", "")).split(".")[-1]
        if kind != "CocoMetric":
            return None
        kinds = spec.get("metric", "bbox")
        for metric in [kinds] if isinstance(kinds, str) else kinds:
            if metric in ("bbox", "segm"):
                keys += [f"{metric}_{k}" for k in COCO_KEYS]
            else:  # proposal recall: AR@N
                keys += [f"AR@{n}" for n in spec.get("proposal_nums", (100, 300, 1000))]
    return keys


def check_point(exp: Experiment, hparams: dict[str, Any]) -> tuple[list[str], list[str], Any]:
    """``(lines, problems, cfg)`` for one sample point."""
    from mmengine.registry import init_default_scope

    from det_mmdet.trial import build_detector, check_class_counts

    raw = {**exp.config, "hyperparameters": hparams}
    point = Experiment(path=exp.path, config=raw, hparams=copy.deepcopy(hparams))
    lines: list[str] = []
    if point.data.get("classes_from_annotations"):
        # The annotation file is read where the trial runs; a cluster path is named, not read, here.
        try:
            cfg = build_config(point)
        except UserError as e:
            lines.append(f"not checkable here: classes from the training annotations ({e})")
            point.config = {**raw, "data": {**point.data, "classes_from_annotations": False}}
            cfg = build_config(point)
    else:
        cfg = build_config(point)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    classes = list((_train_dataset(cfg).get("metainfo") or {}).get("classes") or ())
    check_class_counts(cfg.model, classes)
    model = build_detector(cfg.model)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    shown = f"{len(classes)} classes" if classes else "classes from the data set"
    lines.append(f"ok: {cfg.model.get('type')} built ({params:.1f} M parameters), {shown}")
    return lines, [], cfg


def _train_dataset(cfg) -> dict[str, Any]:
    from det_mmdet.config import train_dataset

    return train_dataset(cfg.to_dict())


def check_searcher(exp_conf: dict[str, Any], cfg) -> tuple[list[str], list[str]]:
    searcher = exp_conf.get("searcher") or {}
    keys = reported_keys(cfg)
    wanted = [("searcher.metric", searcher.get("metric"))]
    if searcher.get("name") == "adaptive_asha" or searcher.get("time_metric"):
        wanted.append(("searcher.time_metric", searcher.get("time_metric")))
    lines, problems = [], []
    for field, name in wanted:
        if not name:
            if field == "searcher.time_metric":
                problems.append("searcher.time_metric: adaptive_asha needs it (and max_time) in Determined 0.38")
            continue
        if keys is None:
            lines.append(f"not checkable here: {field} {name} (an evaluator whose keys are not known here)")
        elif name in keys:
            lines.append(f"ok: {field} {name} is reported by every validation")
        else:
            shown = ", ".join(k for k in keys if k not in ALWAYS_REPORTED[2:])
            problems.append(f"{field} {name}: validation does not report it (it reports {shown})")
    return lines, problems


def check_paths(exp: Experiment, cfg, hparams: dict[str, Any]) -> tuple[list[str], list[str]]:
    mounts = list(exp.config.get("bind_mounts") or [])
    ignored = _ignored(CONTEXT_DIR)
    lines, problems = [], []
    found: list[tuple[str, str, bool]] = []
    for key in ("config_file", "merge_config"):
        name = hparams.get(key)
        if not name:
            continue
        if "://" in str(name) or str(name).startswith("/"):
            found.append((f"hyperparameters.{key}", str(name), False))
            continue
        try:
            path = locate(str(name), key, [CONTEXT_DIR], packaged=key == "config_file")
        except UserError as e:
            problems.append(f"hyperparameters.{key}: not found from the context directory ({e})")
            continue
        if CONTEXT_DIR in path.parents:
            found.append((f"hyperparameters.{key}", path.relative_to(CONTEXT_DIR).as_posix(), False))
        else:
            lines.append(f"ok: hyperparameters.{key} {name} (mmdet's packaged configs, in the image)")
    tree = cfg.to_dict()
    for key in TRIAL_READS:  # test_dataloader and leftovers such as a top-level train_dataset are not read
        found += list(_dataset_paths(tree.get(key), key))
    if cfg.get("load_from"):
        found.append(("load_from", str(cfg.load_from), False))
    for key, path, is_dir in dict.fromkeys(found):
        ok, line = where_from(key, path, is_dir, mounts, ignored)
        (lines if ok else problems).append(line)
    return lines, problems


def check_experiment(path: str | Path) -> tuple[list[str], list[str]]:
    """``(lines, problems)`` for every sample point of the experiment at ``path``."""
    exp = load_experiment(path)
    lines: list[str] = []
    problems: list[str] = []
    points = sample_points(exp.config.get("hyperparameters") or {})
    lines.append(f"{path}: {len(points)} sample point(s) of the search space")
    for label, hparams in points:
        lines.append(f"-- {label}")
        try:
            found, bad, cfg = check_point(exp, hparams)
        except UserError as e:
            problems.append(f"{label}: {e}")
            continue
        searched, unsearched = check_searcher(exp.config, cfg)
        placed, misplaced = check_paths(exp, cfg, hparams)
        lines += found + searched + placed
        problems += [f"{label}: {p}" for p in itertools.chain(bad, unsearched, misplaced)]
    return list(dict.fromkeys(lines)), list(dict.fromkeys(problems))


def run(path: str | Path) -> int:
    from det_mmdet import logs

    with logs.quiet_mmengine():
        lines, problems = check_experiment(path)
    for line in lines:
        print(line)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{len(problems)} problem(s)" if problems else "no problems found")
    return 2 if problems else 0

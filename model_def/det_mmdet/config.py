"""Experiment YAML -> final mmengine ``Config``.

Resolution order (later wins):
1. ``hyperparameters.config_file``: a path, a name inside mmdet's packaged configs, or one under
   ``$MMDETECTION_CONFIG_DIR``;
2. ``hyperparameters.merge_config``: an mmdet-format partial config merged in (``_delete_`` works);
3. ``hyperparameters.override_mmdet_config``: dotted keys -> values (data, never code);
4. ``--set key=value`` from the command line;
and ``data.backend_args`` / ``data.file_client_args`` substituted into every loader and evaluator.
"""

from __future__ import annotations

import ast
import copy
import difflib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")

# model_def/, the Determined context directory: the cluster's working directory.
CONTEXT_DIR = Path(__file__).resolve().parent.parent

# Top-level names mmengine's Runner understands even when a config does not set them.
MMENGINE_FIELDS = frozenset(
    """model data_preprocessor train_dataloader val_dataloader test_dataloader train_cfg val_cfg
    test_cfg optim_wrapper param_scheduler val_evaluator test_evaluator auto_scale_lr default_hooks
    custom_hooks default_scope env_cfg log_processor log_level load_from resume launcher randomness
    visualizer vis_backends work_dir experiment_name custom_imports model_wrapper_cfg backend_args
    data_root dataset_type metainfo classes compile cfg strategy find_unused_parameters""".split()
)

SEARCH_TYPES = ("const", "int", "double", "log", "categorical")

# Pipeline steps and evaluators that read files and therefore take ``backend_args``.
FILE_READERS = frozenset(
    {
        "LoadImageFromFile",
        "LoadAnnotations",
        "LoadPanopticAnnotations",
        "LoadMultiChannelImageFromFiles",
        "LoadTrackAnnotations",
        "mmdet.LoadImageFromFile",
        "mmdet.LoadAnnotations",
    }
)

SECRET_KEY = re.compile(r"secret|password|passwd|token|access_key|key_id|credential", re.I)


@dataclass
class Experiment:
    """An experiment YAML with its hyperparameters resolved to concrete values."""

    path: Path | None
    config: dict[str, Any]
    hparams: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def data(self) -> dict[str, Any]:
        return self.config.get("data") or {}

    @property
    def name(self) -> str:
        if self.config.get("name"):
            return str(self.config["name"])
        return self.path.stem if self.path else "experiment"


# ---------------------------------------------------------------------------------------------
# Experiment YAML and Determined search spaces


def load_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{what} {path}: invalid YAML{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path}: invalid YAML: {e}") from None


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    raw = load_yaml(path, "experiment")
    if not isinstance(raw, dict):
        raise UserError(f"experiment {path}: expected a mapping at the top, got {type(raw).__name__}")
    return experiment_from_dict(raw, path)


def experiment_from_dict(raw: dict[str, Any], path: Path | None = None) -> Experiment:
    """``raw`` is an experiment config; its hyperparameters may still be search spaces."""
    hps = raw.get("hyperparameters") or {}
    if not isinstance(hps, dict):
        raise UserError(f"{path or 'experiment'}: hyperparameters must be a mapping")
    notes: list[str] = []
    values = resolve_search_spaces(hps, "", notes)
    return Experiment(path=path, config=raw, hparams=values, notes=notes)


def experiment_for_trial(exp_conf: dict[str, Any], hparams: dict[str, Any]) -> Experiment:
    """A cluster trial's experiment: the experiment config with the searcher's sampled hyperparameters.

    The master has already sampled every search space (a ``const`` arrives as its raw value, nesting
    kept), so the values are taken as they are: resolving them again would read a sampled mapping
    such as ``{optimizer: {type: AdamW}}`` as a search space. Nested mappings of plain values are read
    by ``override_mmdet_config`` the same as dotted keys.
    """
    if not isinstance(hparams, dict):
        raise UserError(f"hyperparameters must be a mapping, the master sent {type(hparams).__name__}")
    return Experiment(path=None, config={**exp_conf, "hyperparameters": hparams}, hparams=copy.deepcopy(hparams))


def resolve_search_spaces(node: Any, name: str, notes: list[str]) -> Any:
    """Pick the documented local value for every Determined search space in ``node``.

    const -> val, int/double -> midpoint, log -> base ** midpoint exponent, categorical -> first.
    On a cluster Determined samples these instead and hands the trial plain values.
    """
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind is None:
        return {k: resolve_search_spaces(v, f"{name}.{k}" if name else str(k), notes) for k, v in node.items()}
    if kind not in SEARCH_TYPES:
        raise UserError(
            f"hyperparameter {name}: type {kind!r} is not a Determined search space "
            f"({', '.join(SEARCH_TYPES)}); wrap a mapping value as {{type: const, val: ...}}"
        )
    try:
        if kind == "const":
            return node["val"]
        if kind == "categorical":
            value = node["vals"][0]
            how = "first category"
        elif kind == "int":
            value = (int(node["minval"]) + int(node["maxval"])) // 2
            how = "midpoint"
        elif kind == "double":
            value = (float(node["minval"]) + float(node["maxval"])) / 2
            how = "midpoint"
        else:  # log
            base = float(node.get("base", 10))
            value = base ** ((float(node["minval"]) + float(node["maxval"])) / 2)
            how = f"base {base:g} to the midpoint exponent"
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise UserError(f"hyperparameter {name}: malformed {kind} search space ({e!r})") from None
    notes.append(f"hyperparameter {name}: {kind} search space -> {value!r} locally ({how})")
    return value


# ---------------------------------------------------------------------------------------------
# Finding and loading mmdet config files


def mmdet_config_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("MMDETECTION_CONFIG_DIR"):
        dirs.append(Path(os.environ["MMDETECTION_CONFIG_DIR"]))
    import mmdet

    dirs.append(Path(mmdet.__file__).parent / ".mim" / "configs")
    return dirs


def locate(name: str, what: str, base_dirs: Iterable[Path], packaged: bool) -> Path:
    """Find ``name`` as given, relative to ``base_dirs``, then (if ``packaged``) in mmdet's configs."""
    name = str(name)
    bare = name.removeprefix("mmdet::")
    candidates = [Path(name).expanduser()]
    if not Path(bare).is_absolute():
        candidates += [d / bare for d in base_dirs]
        if packaged:
            candidates += [d / bare for d in mmdet_config_dirs()]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise UserError(f"{what} {name!r} not found; looked in: {looked}")


def load_config_file(path: Path, what: str):
    """Load an mmengine config (``.py``, ``.yaml``/``.yml``, ``.json``) with a one-line error."""
    from mmengine.config import Config

    if path.suffix == ".py":
        try:
            ast.parse(path.read_text(), filename=str(path))
        except SyntaxError as e:
            raise UserError(f"{what} {path}: syntax error at line {e.lineno}: {e.msg}") from None
    elif path.suffix in (".yaml", ".yml", ".json"):
        load_yaml(path, what)  # one-line error for a parse failure
    else:
        raise UserError(f"{what} {path}: unsupported file type {path.suffix!r} (use .py, .yaml, .yml or .json)")
    try:
        return Config.fromfile(str(path))
    except (FileNotFoundError, KeyError, NameError, ImportError, TypeError) as e:
        raise UserError(f"{what} {path}: cannot load: {e}") from None


# ---------------------------------------------------------------------------------------------
# Dotted-key overrides


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` pairs from the command line; values are parsed as YAML data."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: value is not valid YAML") from None
    return out


def apply_overrides(cfg: dict[str, Any], overrides: Mapping[str, Any], source: str) -> None:
    """Set every dotted key of ``overrides`` in ``cfg`` (a plain nested dict), in order."""
    if not isinstance(overrides, Mapping):
        raise UserError(f"{source} must be a mapping of dotted keys to values, got {type(overrides).__name__}")
    for key, value in overrides.items():
        key = str(key)
        top = key.split(".")[0]
        if top not in cfg and top not in MMENGINE_FIELDS:
            close = difflib.get_close_matches(top, sorted(set(cfg) | MMENGINE_FIELDS), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"{source}: unknown key {key!r}: {top!r} is not in the config{hint}")
        set_dotted(cfg, key, value, source)


def set_dotted(root: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node: Any = root
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            if last:
                _assign(node, part, value)
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        elif isinstance(node, (list, tuple)):
            if not re.fullmatch(r"-?\d+", part) or not -len(node) <= int(part) < len(node):
                raise UserError(f"{source}: {key!r}: {here!r} is not an index of a list of {len(node)} items")
            if last:
                if isinstance(node, tuple):
                    raise UserError(f"{source}: {key!r}: {'.'.join(parts[:depth])!r} is a tuple; set it whole")
                node[int(part)] = _merged(node[int(part)], value)
                return
            node = node[int(part)]
        else:
            parent = ".".join(parts[:depth])
            raise UserError(f"{source}: cannot set {key!r}: {parent!r} is {node!r}, not a mapping or list")


def _assign(node: dict[str, Any], key: str, value: Any) -> None:
    node[key] = _merged(node.get(key), value)


def _merged(old: Any, new: Any) -> Any:
    """A mapping merges into a mapping (mmengine semantics; ``_delete_: true`` replaces)."""
    if isinstance(new, dict) and isinstance(old, dict) and not new.get("_delete_"):
        out = dict(old)
        for k, v in new.items():
            out[k] = _merged(old.get(k), v)
        return out
    if isinstance(new, dict):
        return {k: v for k, v in new.items() if k != "_delete_"}
    if isinstance(old, tuple) and isinstance(new, list):
        # YAML has no tuples; where the config holds one (RandomResize's scale: a list there would mean
        # a choice among scales), the value given in its place is a tuple too.
        if len(old) == len(new):
            return tuple(_merged(o, n) for o, n in zip(old, new, strict=True))
        return tuple(copy.deepcopy(new))
    return copy.deepcopy(new)


def flatten_overrides(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Determined may hand nested hyperparameters; a nested mapping means the same as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and not v.get("_delete_") and "type" not in v:
            out.update(flatten_overrides(v, key))
        else:
            out[key] = v
    return out


def rebase_data_root(node: Any, old: str, new: str) -> None:
    """A new top-level ``data_root`` reaches every dataset and evaluator that used the old one.

    mmengine substitutes ``data_root`` into the datasets when the file is read, so overriding the
    top-level name alone would change nothing; here it does what a user means by it.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data_root" and value == old:
                node[key] = new
            elif key in ("ann_file", "seg_prefix") and isinstance(value, str) and value.startswith(old):
                node[key] = new + value[len(old) :]
            else:
                rebase_data_root(value, old, new)
    elif isinstance(node, (list, tuple)):
        for value in node:
            rebase_data_root(value, old, new)


# ---------------------------------------------------------------------------------------------
# Storage backends


DATA_KEYS = (
    "backend_args",
    "file_client_args",
    "cache_dir",
    "cache_max_gb",
    "annotation_cache_dir",
    "classes_from_annotations",
    "coco_backend",
    "fast_transforms",
    "annotation_cache",
    "reuse_worker_heap",
)
CACHE_KEYS = ("cache_dir", "cache_max_gb", "annotation_cache_dir")


def backend_args_from_data(data: Mapping[str, Any], data_root: Any = None) -> dict[str, Any] | None:
    """The ``backend_args`` the experiment's ``data`` section asks for (None: leave the config's).

    ``data.backend_args`` is mmengine's form, ``data.file_client_args`` the old model-hub one; the
    cache settings go to the s3/gcs backends, whether named there or picked by a URI's prefix.
    """
    from mmengine.fileio.backends import backends as registered

    from det_mmdet import backends

    if not isinstance(data, Mapping):
        raise UserError(f"data must be a mapping, got {data!r}")
    for key in data:
        if key not in DATA_KEYS:
            raise UserError(f"data.{key}: unknown key; allowed: {', '.join(DATA_KEYS)}")
    if data.get("backend_args") is not None and data.get("file_client_args") is not None:
        raise UserError("data: give either backend_args or file_client_args, not both")
    name = "backend_args" if data.get("backend_args") is not None else "file_client_args"
    args = data.get(name)
    cache = {k: data[k] for k in CACHE_KEYS if data.get(k) is not None}
    if args is None and not cache:
        return None
    if args is not None and (not isinstance(args, Mapping) or "backend" not in args):
        raise UserError(f"data.{name} must be a mapping with a 'backend' key, got {args!r}")
    args = dict(args or {})
    kind = args.get("backend")
    if kind is not None and kind not in registered:
        raise UserError(f"data.{name}.backend {kind!r} is not one of: {', '.join(sorted(registered))}")
    remote_root = isinstance(data_root, str) and data_root.startswith(backends.REMOTE_PREFIXES)
    if cache and not (kind in backends.REMOTE_BACKENDS or (kind is None and remote_root)):
        raise UserError(
            f"data.{next(iter(cache))}: caching applies to s3 or gcs data (a data_root of s3:// or gs://, "
            f"or data.{name}.backend s3|gcs), got backend {kind or 'disk'!r} and data_root {data_root!r}"
        )
    args.update(cache)
    if kind in backends.REMOTE_BACKENDS or kind is None:
        for key in args:
            if key.lower() in backends.CREDENTIAL_KEYS:
                raise UserError(
                    f"data.{name}.{key}: credentials do not belong in the experiment; use the environment "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS) "
                    "or an instance role"
                )
            if key != "backend" and key not in backends.OPTIONS:
                raise UserError(f"data.{name}.{key}: unknown option; allowed: {', '.join(sorted(backends.OPTIONS))}")
    if kind in ("disk", "local"):
        return None  # mmengine's default: local files
    return args


def classes_from_annotations(tree: dict[str, Any]) -> list[str]:
    """Take the class names from the training annotation file and make the whole config agree.

    Every dataset gets ``metainfo.classes`` (mmdet maps category names to labels with it) and every
    ``num_classes`` in the model becomes their count, so a custom data set needs no class list.
    """
    import json

    from mmengine.fileio import get_local_path

    dataset = train_dataset(tree)
    if not dataset.get("ann_file"):
        raise UserError("data.classes_from_annotations: train_dataloader.dataset has no ann_file")
    ann_file, root = str(dataset["ann_file"]), str(dataset.get("data_root") or "")
    if root and not (ann_file.startswith("/") or "://" in ann_file):
        ann_file = root.rstrip("/") + "/" + ann_file
    try:
        with get_local_path(ann_file, backend_args=dataset.get("backend_args")) as local:
            categories = json.loads(Path(local).read_text()).get("categories") or []
    except FileNotFoundError:
        raise UserError(f"data.classes_from_annotations: {ann_file} does not exist") from None
    names = [str(c["name"]) for c in sorted(categories, key=lambda c: c["id"])]
    if not names:
        raise UserError(f"data.classes_from_annotations: {ann_file} lists no categories")
    set_classes(tree, names)
    logger.info(
        "classes from %s: %s (%d)", ann_file, ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""), len(names)
    )
    return names


def train_dataset(tree: dict[str, Any]) -> dict[str, Any]:
    """The training dataset's own config, inside wrappers such as RepeatDataset."""
    dataset = (tree.get("train_dataloader") or {}).get("dataset") or {}
    while "ann_file" not in dataset and isinstance(dataset.get("dataset"), dict):
        dataset = dataset["dataset"]
    return dataset


def set_classes(tree: dict[str, Any], names: list[str]) -> None:
    """``names`` in every dataset's metainfo and every class count of the model.

    That is every ``num_classes`` and ``num_things_classes`` (``num_stuff_classes`` becomes 0: an
    instance annotation file has things only), per-class loss weights, and the top-level names
    configs build them from (``classes``, ``num_classes``, ...).
    """
    _set_classes(tree, names)
    for key in ("num_classes", "num_things_classes"):
        if isinstance(tree.get(key), int):
            tree[key] = len(names)
    if isinstance(tree.get("num_stuff_classes"), int):
        tree["num_stuff_classes"] = 0
    # Top-level names a config uses to build its datasets (custom_coco.py's style), kept consistent.
    if "classes" in tree:
        tree["classes"] = tuple(names)
    if isinstance(tree.get("metainfo"), dict):
        tree["metainfo"] = {"classes": tuple(names)}


def _set_classes(node: Any, names: list[str], in_model: bool = False, where: str = "") -> None:
    if isinstance(node, dict):
        if "ann_file" in node and "pipeline" in node:  # a dataset (evaluators have ann_file too)
            node["metainfo"] = {**{k: v for k, v in (node.get("metainfo") or {}).items() if k != "palette"},
                                "classes": tuple(names)}  # fmt: skip
        for key, value in node.items():
            path = f"{where}.{key}" if where else key
            if in_model and key in SEGMENTATION_HEADS:
                continue  # its classes are the stuff map's (HTC: 183 COCO-stuff classes), not the boxes'
            if in_model and key in ("num_classes", "num_things_classes"):
                node[key] = len(names)
            elif in_model and key == "num_stuff_classes":
                node[key] = 0  # an instance annotation file: every class is a thing
            elif in_model and key == "class_weight" and isinstance(value, (list, tuple)):
                node[key] = _resized_class_weight(list(value), len(names), path)
            else:
                _set_classes(value, names, in_model or key == "model", path)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _set_classes(value, names, in_model, f"{where}.{i}")


# Heads that segment the stuff map (semantic classes of their own): not class counts of the detector.
SEGMENTATION_HEADS = ("semantic_head",)


def _resized_class_weight(weights: list, count: int, path: str) -> list:
    """A per-class loss weight list (classes + background, Mask2Former's) for ``count`` classes."""
    classes, background = weights[:-1], weights[-1:]
    if len(set(classes)) > 1:
        raise UserError(f"{path} weighs its {len(classes)} classes differently; give it {count} + 1 values")
    return [classes[0] if classes else 1.0] * count + background


def class_count_fields(node: Any, where: str = "model") -> list[tuple[str, int]]:
    """Every class-count field of a model config: ``num_classes``, and things + stuff for panoptic heads."""
    found: list[tuple[str, int]] = []
    if isinstance(node, dict):
        if isinstance(node.get("num_things_classes"), int):
            found.append(
                (f"{where}.num_things_classes", node["num_things_classes"] + int(node.get("num_stuff_classes") or 0))
            )
        if isinstance(node.get("num_classes"), int):
            found.append((f"{where}.num_classes", node["num_classes"]))
        for key, value in node.items():
            if key not in SEGMENTATION_HEADS:
                found += class_count_fields(value, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += class_count_fields(value, f"{where}.{i}")
    return found


def substitute_backend_args(node: Any, backend_args: dict[str, Any] | None) -> int:
    """Put ``backend_args`` on every file-reading step, dataset and evaluator; returns the count."""
    count = 0
    if isinstance(node, dict):
        kind = str(node.get("type", ""))
        reads_files = kind in FILE_READERS or kind.endswith("Metric") or "ann_file" in node
        if reads_files or "backend_args" in node:
            node["backend_args"] = copy.deepcopy(backend_args)
            count += 1
        for v in node.values():
            count += substitute_backend_args(v, backend_args)
    elif isinstance(node, (list, tuple)):
        for v in node:
            count += substitute_backend_args(v, backend_args)
    return count


def redact(node: Any) -> Any:
    """A copy with every credential-looking value replaced, for printing and saving."""
    if isinstance(node, dict):
        return {k: "***" if SECRET_KEY.search(str(k)) and v else redact(v) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    if isinstance(node, tuple):
        return tuple(redact(v) for v in node)
    return node


# ---------------------------------------------------------------------------------------------
# The whole resolution


def build_config(exp: Experiment, sets: Mapping[str, Any] | None = None):
    """The final mmengine ``Config`` for ``exp`` plus command-line ``sets``."""
    from mmengine.config import Config

    hp = exp.hparams
    where = str(exp.path) if exp.path else "experiment"
    if "config_file" not in hp:
        raise UserError(f"{where}: hyperparameters.config_file is required")
    if "global_batch_size" not in hp and "training_batch_size" not in hp:
        raise UserError(
            f"{where}: hyperparameters.global_batch_size is required (Determined splits it across slots), "
            "or training_batch_size (per slot)"
        )
    bases = [Path.cwd()] + ([exp.path.parent.resolve()] if exp.path else []) + [CONTEXT_DIR]

    cfg_path = locate(hp["config_file"], "config_file", bases, packaged=True)
    cfg = load_config_file(cfg_path, "config_file")
    if hp.get("merge_config"):
        merge_path = locate(hp["merge_config"], "merge_config", bases, packaged=False)
        cfg.merge_from_dict(load_config_file(merge_path, "merge_config").to_dict())

    tree = cfg.to_dict()
    from det_mmdet import knobs

    applied = knobs.apply(tree, hp)  # before the overrides, so that those still win
    overrides = hp.get("override_mmdet_config") or {}
    if not isinstance(overrides, Mapping):
        raise UserError(f"{where}: hyperparameters.override_mmdet_config must be a mapping")
    data_root = tree.get("data_root")
    apply_overrides(tree, flatten_overrides(overrides), "override_mmdet_config")
    apply_overrides(tree, sets or {}, "--set")
    if isinstance(data_root, str) and data_root and tree.get("data_root") != data_root:
        new_root = str(tree["data_root"])
        if data_root.endswith("/") and not new_root.endswith("/"):
            tree["data_root"] = new_root = new_root + "/"
        rebase_data_root(tree, data_root, new_root)

    if "coco_backend" in exp.data:
        from det_mmdet.coco import check_backend

        check_backend(exp.data["coco_backend"])
    if "fast_transforms" in exp.data:
        from det_mmdet.fast_transforms import check_enabled

        check_enabled(exp.data["fast_transforms"])
    if "annotation_cache" in exp.data:
        from det_mmdet.annotation_cache import check_setting

        check_setting(exp.data["annotation_cache"])
    if "reuse_worker_heap" in exp.data:
        from det_mmdet import worker_heap

        worker_heap.check_setting(exp.data["reuse_worker_heap"])
    backend_args = backend_args_from_data(exp.data, tree.get("data_root"))
    if backend_args is not None or exp.data.get("backend_args") or exp.data.get("file_client_args"):
        substitute_backend_args(tree, backend_args)
    infer = applied and "classes" not in applied and not (train_dataset(tree).get("metainfo") or {}).get("classes")
    if exp.data.get("classes_from_annotations") or infer:  # infer: what the fine-tune knobs promise
        classes_from_annotations(tree)
    if "metric_for_best_model" in applied:
        wanted, searcher = knobs.metric_name(hp), (exp.config.get("searcher") or {}).get("metric")
        if searcher is not None and searcher != wanted:
            raise UserError(f"hyperparameters.metric_for_best_model selects {wanted} but searcher.metric is {searcher}")
    from det_mmdet import weights

    tree["load_from"] = weights.resolve_source(hp, cfg_path, tree.get("load_from"))
    import_custom_modules(tree.get("custom_imports"))
    return Config(tree, filename=str(cfg_path))


def import_custom_modules(spec: Any) -> None:
    """``custom_imports`` (hooks, transforms, models of the user's own), also when set by an override.

    mmengine imports them when it reads a config file; one set afterwards would otherwise be ignored.
    """
    if not spec:
        return
    from mmengine.utils import import_modules_from_strings

    if not isinstance(spec, Mapping) or not isinstance(spec.get("imports"), (str, list, tuple)):
        raise UserError(f"custom_imports must be dict(imports=[module, ...]), got {spec!r}")
    try:
        import_modules_from_strings(spec["imports"], bool(spec.get("allow_failed_imports", False)))
    except ImportError as e:
        raise UserError(f"custom_imports: cannot import {e.name or spec['imports']}: {e}") from None


def pretty_text(cfg) -> str:
    """mmengine's pretty text of ``cfg`` with credentials redacted."""
    from mmengine.config import Config

    return Config(redact(cfg.to_dict()), filename=cfg.filename).pretty_text

"""Pretrained weights: find them in mmdet's metafiles, fetch them once per node, load them leniently.

``hyperparameters.use_pretrained: true`` looks the chosen ``config_file`` up in the ``metafile.yml``
files mmdet ships with its configs; ``hyperparameters.load_from`` (or mmengine's own top-level
``load_from``) names a file, ``http(s)://``, ``s3://`` or ``gs://`` checkpoint. Downloads land in
``$DET_MMDET_CACHE`` (default ``~/.cache/det-mmdet``) under a file lock, so the ranks of a node fetch
once; the size is checked, and the sha256 prefix that OpenMMLab file names carry
(``..._20200130-047c8118.pth``). ``DET_MMDET_WEIGHTS_MIRROR`` replaces download.openmmlab.com.

Loading is non-strict in one sense only: tensors whose shape differs from the model's (a head for
another number of classes) are skipped, and the log says what was loaded, skipped and missing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from det_mmdet.errors import UserError

logger = logging.getLogger("det_mmdet")

OPENMMLAB = "https://download.openmmlab.com"
MIRROR_ENV = "DET_MMDET_WEIGHTS_MIRROR"
TORCHVISION = "https://download.pytorch.org"
TORCHVISION_MIRROR_ENV = "DET_MMDET_TORCHVISION_MIRROR"
MIRRORS = {OPENMMLAB: MIRROR_ENV, TORCHVISION: TORCHVISION_MIRROR_ENV}
SCHEMES = ("torchvision://", "modelzoo://", "open-mmlab://", "openmmlab://", "mmcls://")
CACHE_ENV = "DET_MMDET_CACHE"
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth$")


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "det-mmdet")
    return Path(base) / "weights"


# ---- finding --------------------------------------------------------------------------------------


def mmdet_config_root() -> Path:
    import mmdet

    return Path(mmdet.__file__).resolve().parent / ".mim" / "configs"


@functools.lru_cache(maxsize=1)
def metafile_weights() -> dict[str, str]:
    """``configs/<dir>/<name>.py`` -> weights URL, from every metafile.yml mmdet ships."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    found: dict[str, str] = {}
    for metafile in sorted(mmdet_config_root().glob("*/metafile.yml")):
        doc = yaml.load(metafile.read_text(), Loader=loader) or {}
        models = doc if isinstance(doc, list) else doc.get("Models") or []  # objects365's is a bare list
        for model in models:
            if model.get("Config") and model.get("Weights"):
                found[str(model["Config"])] = str(model["Weights"])
    return found


def pretrained_url(config_path: Path) -> str:
    root = mmdet_config_root()
    try:
        key = "configs/" + config_path.resolve().relative_to(root).as_posix()
    except ValueError:
        raise UserError(
            f"use_pretrained: {config_path} is not one of mmdet's packaged configs, so no metafile lists "
            "weights for it; set hyperparameters.load_from to a checkpoint"
        ) from None
    url = metafile_weights().get(key)
    if url is None:
        raise UserError(f"use_pretrained: mmdet's metafiles list no weights for {key}; set hyperparameters.load_from")
    return url


# ---- fetching -------------------------------------------------------------------------------------


def scheme_url(source: str, what: str) -> str:
    """The URL behind mmengine's checkpoint schemes, from the tables mmengine reads; others unchanged.

    ``torchvision://`` names come from ``get_torchvision_models``, as mmengine's own loader takes them:
    its table of torchvision 0.12 names plus the installed torchvision's weights (``resnet50.imagenet1k_v1``,
    ``resnet50.default``).
    """
    if not source.startswith(SCHEMES):
        return source
    from mmengine.runner.checkpoint import (
        get_deprecated_model_names,
        get_external_models,
        get_mmcls_models,
        get_torchvision_models,
    )

    scheme, name = source.split("://", 1)
    if scheme in ("torchvision", "modelzoo"):
        table = get_torchvision_models()
    elif scheme == "mmcls":
        table = get_mmcls_models()
    else:
        table = get_external_models()
        name = get_deprecated_model_names().get(name, name)
    if name not in table:
        close = ", ".join(sorted(k for k in table if k.split("_")[0] == name.split("_")[0])[:6]) or "none alike"
        raise UserError(f"{what}: {source}: mmengine knows no {scheme} checkpoint {name!r} (similar: {close})")
    return str(table[name])


def local_copy(source: str, what: str = "load_from") -> Path:
    """A local file for ``source``: itself, or a verified download in the cache."""
    from det_mmdet import backends  # registers s3/gcs

    if source.startswith(backends.REMOTE_PREFIXES):
        from mmengine.fileio import get_file_backend

        return get_file_backend(source).fetch_to_cache(source)
    if source.startswith(("http://", "https://")):
        return download(source, what)
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{what}: {source} does not exist")
    return path


def download(url: str, what: str = "load_from") -> Path:
    from filelock import FileLock

    host = next((h for h in MIRRORS if url.startswith(h)), None)
    mirror = os.environ.get(MIRRORS[host]) if host else None
    fetch_url = mirror.rstrip("/") + url[len(host) :] if host and mirror else url
    target = cache_dir() / url.split("://", 1)[1]
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            logger.info("pretrained weights from the cache: %s", target)
            return target
        partial = target.with_name(target.name + ".partial")
        try:
            size = _fetch(fetch_url, partial)
        except (urllib.error.URLError, OSError) as e:
            partial.unlink(missing_ok=True)
            reason = getattr(e, "reason", None) or e
            fix = f"set {MIRRORS[host]} to a mirror of {host}" if host else "make it reachable"
            local = "hyperparameters.load_from" if what == "load_from" else what
            raise UserError(
                f"{what}: cannot download {fetch_url} ({reason}); {fix} or {local} to a local file"
            ) from None
        _verify(partial, url, size)
        os.replace(partial, target)
        logger.info("downloaded %s (%.1f MB) into %s", fetch_url, target.stat().st_size / 1e6, target)
    return target


def _fetch(url: str, dest: Path) -> int | None:
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        size = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=size, unit="B", unit_scale=True, desc=Path(url).name, leave=False) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    return size


def _verify(path: Path, url: str, expected_size: int | None) -> None:
    actual = path.stat().st_size
    if expected_size is not None and actual != expected_size:
        path.unlink()
        raise UserError(f"{url}: downloaded {actual} bytes of {expected_size}; try again")
    match = HASH_IN_NAME.search(url)
    if match:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(match.group(1)):
            path.unlink()
            raise UserError(f"{url}: sha256 {digest[:8]}... does not match the {match.group(1)} in its name")


# ---- loading --------------------------------------------------------------------------------------


def read_state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint: a state_dict, det-mmdet's model.pth or one mmengine's Runner wrote.

    A Runner checkpoint's ``state_dict`` holds the EMA weights where the run had an EMAHook (it swaps
    them in before saving), which is what mmengine's own ``load_from`` loads too.
    """
    from det_mmdet import mmengine_checkpoints

    checkpoint = mmengine_checkpoints.load(path, f"load_from: {source}")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"load_from: {source} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(
    model: torch.nn.Module, source: str, state: dict[str, torch.Tensor] | None = None
) -> dict[str, list[str]]:
    """Copy matching tensors from ``source`` (or ``state``, read already) into ``model``.

    Returns what was loaded, skipped (other shape), missing and unexpected.
    """
    if state is None:
        state = read_state_dict(local_copy(source), source)
    own = model.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if not loaded:
        raise UserError(f"load_from: no tensor of {source} matches the model (different architecture?)")
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    logger.info("loaded %d tensors from %s", len(loaded), source)
    if skipped:
        logger.info("skipped %d whose shape differs (e.g. another number of classes): %s", len(skipped), _few(skipped))
    if missing:
        logger.info("%d model tensors not in the checkpoint keep their initialisation: %s", len(missing), _few(missing))
    if unexpected:
        logger.info("%d checkpoint tensors not in the model: %s", len(unexpected), _few(unexpected))
    return {"loaded": loaded, "skipped": skipped, "missing": missing, "unexpected": unexpected}


def _few(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def resolve_source(hparams: dict[str, Any], cfg_path: Path, cfg_load_from: Any) -> str | None:
    """hyperparameters.load_from, else use_pretrained's metafile URL, else the config's load_from."""
    if hparams.get("load_from") and hparams.get("use_pretrained"):
        raise UserError("hyperparameters: give use_pretrained or load_from, not both")
    if hparams.get("load_from"):
        return str(hparams["load_from"])
    if hparams.get("use_pretrained"):
        return pretrained_url(cfg_path)
    return str(cfg_load_from) if cfg_load_from else None


# ---- backbone init_cfg checkpoints ----------------------------------------------------------------


def resolve_pretrained_inits(model: torch.nn.Module, load_from: dict[str, torch.Tensor] | None = None) -> None:
    """Point every ``Pretrained`` init_cfg of the built model at a local, verified file.

    A module whose every tensor ``load_from`` provides (same shape) does not need its ImageNet
    checkpoint: that init is dropped, so a fine-tune from a detector checkpoint downloads nothing more.
    """
    for name, module in model.named_modules():
        init = getattr(module, "init_cfg", None)
        if not init:
            continue
        specs = list(init) if isinstance(init, (list, tuple)) else [init]
        kept = []
        for spec in specs:
            if not (isinstance(spec, dict) and spec.get("type") == "Pretrained" and spec.get("checkpoint")):
                kept.append(spec)
                continue
            where = f"model.{name}.init_cfg" if name else "model.init_cfg"
            if load_from is not None and _covers(load_from, module, name):
                logger.info("%s: %s not needed, load_from holds all of its tensors", where, spec["checkpoint"])
                continue
            spec["checkpoint"] = str(resolve_checkpoint(str(spec["checkpoint"]), f"{where}.checkpoint"))
            kept.append(spec)
        module.init_cfg = kept if isinstance(init, (list, tuple)) else (kept[0] if kept else None)


def resolve_checkpoint(source: str, what: str) -> Path:
    """A local file for a checkpoint named the ways mmengine accepts (schemes, URLs, buckets, paths)."""
    path = local_copy(scheme_url(source, what), what)
    if source.startswith("mmcls://"):  # mmcls classifiers: the backbone's tensors, without their prefix
        path = _backbone_only(path, source)
    return path


def _backbone_only(path: Path, source: str) -> Path:
    target = path.with_name(path.stem + ".backbone.pth")
    if not target.is_file():
        state = read_state_dict(path, source)
        backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        torch.save({"state_dict": backbone or state}, target)
    return target


def _covers(state: dict[str, torch.Tensor], module: torch.nn.Module, name: str) -> bool:
    prefix = f"{name}." if name else ""
    own = module.state_dict()
    return bool(own) and all(prefix + k in state and state[prefix + k].shape == v.shape for k, v in own.items())

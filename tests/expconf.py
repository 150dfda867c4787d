"""Sanity validation of Determined 0.38.1 experiment configs against Determined's own expconf JSON Schemas.

The schemas (``v0/*.json``, draft-07) use Determined-specific keywords that a stock validator ignores; this module
adds them to a ``jsonschema`` Draft 7 validator (``optionalRef``, ``union``, ``checks``, ``disallowProperties``,
``compareProperties``). ``eventuallyRequired`` / ``eventually`` are left out on purpose: the master enforces them
only after merging cluster defaults, so a sanity check must not. On top of the schemas, :func:`master_errors`
holds the rules the 0.38 master enforces outside them (``adaptive_asha`` needs ``time_metric`` and ``max_time``;
the legacy ``module:TrialClass`` entrypoint is gone).

Typical use::

    from expconf import EXPCONF_DIR, sanity_errors
    errors = sanity_errors(yaml.safe_load(path.read_text()))  # [] when the config is sane
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema import Draft7Validator, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

SCHEMA_BASE = "http://determined.ai/schemas/expconf/v0/"
EXPERIMENT = SCHEMA_BASE + "experiment.json"


def find_expconf_dir() -> Path | None:
    """The directory holding ``v0/`` and ``test_cases/``: the shared checkout, else $DETERMINED_EXPCONF_DIR."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "determined-expconf"]
    if os.environ.get("DETERMINED_EXPCONF_DIR"):
        candidates.append(Path(os.environ["DETERMINED_EXPCONF_DIR"]))
    return next((c for c in candidates if (c / "v0").is_dir()), None)


# None when the schemas are not available: callers (tests) should skip then.
EXPCONF_DIR: Path | None = find_expconf_dir()


def _expconf_dir() -> Path:
    if EXPCONF_DIR is None:
        raise FileNotFoundError(
            "Determined expconf schemas not found: expected ../shared/determined-expconf or $DETERMINED_EXPCONF_DIR"
        )
    return EXPCONF_DIR


@cache
def schemas() -> dict[str, dict[str, Any]]:
    """Every schema in ``v0/``, keyed by its ``$id``, without its ``$schema``.

    jsonschema switches to the stock validator class of a ``$schema`` dialect wherever it meets one (i.e. behind
    every ``$ref``), which would drop the custom keywords; all of these are draft-07, so the key is not needed.
    """
    loaded = (json.loads(p.read_text()) for p in sorted((_expconf_dir() / "v0").glob("*.json")))
    return {s["$id"]: {k: v for k, v in s.items() if k != "$schema"} for s in loaded}


# --- Determined's custom keywords. Each follows jsonschema's signature (validator, value, instance, schema). ---


def _optional_ref(validator: Draft7Validator, ref: str, instance: Any, schema: dict) -> Iterator[ValidationError]:
    """``$ref`` that lets null through."""
    if instance is not None:
        yield from validator.descend(instance, {"$ref": ref}, schema_path="optionalRef")


def _union_key_matches(key: str | None, instance: Any) -> bool:
    """Whether ``instance`` claims to be the union member tagged with ``key`` (see README for the forms)."""
    if key is None or key == "never":
        return False
    if key == "always":
        return True
    kind, _, arg = key.partition(":")
    if kind == "not":
        return not _union_key_matches(arg, instance)
    if kind == "type":
        return isinstance(instance, {"array": list, "object": dict}[arg])
    if not isinstance(instance, dict):
        return False
    if kind == "const":
        name, _, value = arg.partition("=")
        return instance.get(name) == value
    if kind == "hasattr":
        return arg in instance
    if kind == "singleproperty":
        return list(instance) == [arg]
    raise ValueError(f"unknown unionKey {key!r}")


def _union(validator: Draft7Validator, union: dict, instance: Any, schema: dict) -> Iterator[ValidationError]:
    """Valid if any member validates; otherwise report the errors of the first member the value claims to be."""
    claimed: list[ValidationError] | None = None
    for idx, member in enumerate(union["items"]):
        errors = list(validator.descend(instance, member, schema_path=idx))
        if not errors:
            return
        if claimed is None and _union_key_matches(member.get("unionKey"), instance):
            claimed = errors
    if claimed is not None:
        yield from claimed
    else:
        yield ValidationError(union.get("defaultMessage", "does not match any allowed form"))


def _checks(validator: Draft7Validator, checks: dict, instance: Any, schema: dict) -> Iterator[ValidationError]:
    """Each subschema must hold; a failing one is reported by its message alone."""
    for message, subschema in checks.items():
        if next(validator.descend(instance, subschema), None) is not None:
            yield ValidationError(message)


def _disallow_properties(
    validator: Draft7Validator, disallowed: dict, instance: Any, schema: dict
) -> Iterator[ValidationError]:
    """Listed properties must be absent or null."""
    if isinstance(instance, dict):
        for prop, message in disallowed.items():
            if instance.get(prop) is not None:
                yield ValidationError(message)


def _dotted_get(obj: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _compare_properties(
    validator: Draft7Validator, compare: dict, instance: Any, schema: dict
) -> Iterator[ValidationError]:
    """Cross-field comparison; skipped when either side is unset (or of a type the schema rejects anyway)."""
    if not isinstance(instance, dict):
        return
    a_name, b_name, kind = compare["a"], compare["b"], compare["type"]
    a, b = _dotted_get(instance, a_name), _dotted_get(instance, b_name)
    if kind in ("a<b", "a<=b"):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            return
        if a > b or (kind == "a<b" and a == b):
            suffix = "" if kind == "a<b" else " or equal to it"
            yield ValidationError(f"{a_name} must be less than {b_name}{suffix}")
    elif kind == "a_is_subdir_of_b":
        if not isinstance(a, str):
            return
        a_norm = posixpath.normpath(a)
        if posixpath.isabs(a_norm):
            # An absolute path must lie inside b (nothing to compare with while b is unset or not absolute).
            b_norm = posixpath.normpath(b) if isinstance(b, str) else ""
            inside = not posixpath.isabs(b_norm) or posixpath.commonpath([a_norm, b_norm]) == b_norm
        else:
            # A relative path is taken under b, so it must not climb out of it.
            inside = a_norm != ".." and not a_norm.startswith("../")
        if not inside:
            yield ValidationError(f"{a_name} must be a subdirectory of {b_name}")
    else:
        raise ValueError(f"unknown compareProperties type {kind!r}")


ExpconfValidator = jsonschema.validators.extend(
    Draft7Validator,
    {
        "optionalRef": _optional_ref,
        "union": _union,
        "checks": _checks,
        "disallowProperties": _disallow_properties,
        "compareProperties": _compare_properties,
    },
)


@cache
def _registry() -> Registry:
    return Registry().with_resources((sid, Resource(contents=s, specification=DRAFT7)) for sid, s in schemas().items())


@cache
def validator(schema_id: str = EXPERIMENT) -> Draft7Validator:
    """A Draft 7 validator with Determined's sanity-check keywords, resolving ``$ref``s among the local schemas."""
    return ExpconfValidator(schemas()[schema_id], registry=_registry())


def format_path(path: Any) -> str:
    """``<config>.a.b[2]``, the notation Determined uses in its messages."""
    return "<config>" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


# --- Rules the 0.38 master enforces outside the schemas. ---

# `module.path:TrialClass`: the pre-0.38 trial-class entrypoint (a command has a space or no colon).
LEGACY_ENTRYPOINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def master_errors(config: Any) -> list[str]:
    """Errors from the 0.38 master rules that the schemas do not encode."""
    if not isinstance(config, dict):
        return []
    errors = []
    searcher = config.get("searcher")
    if isinstance(searcher, dict) and searcher.get("name") == "adaptive_asha":
        for field in ("time_metric", "max_time"):
            if searcher.get(field) is None:
                errors.append(f"<config>.searcher: adaptive_asha requires {field} (Determined >= 0.38)")
    entrypoint = config.get("entrypoint")
    if isinstance(entrypoint, str) and LEGACY_ENTRYPOINT.fullmatch(entrypoint.strip()):
        errors.append(
            "<config>.entrypoint: the 'module:TrialClass' form is no longer supported (Determined >= 0.38); "
            "use a command such as 'python3 train.py'"
        )
    return errors


def sanity_errors(config: Any, schema_id: str = EXPERIMENT, *, master_checks: bool = True) -> list[str]:
    """Human-readable sanity errors (``<config>.path: message``); empty when the config is sane.

    For the experiment schema the 0.38 master rules (:func:`master_errors`) are added unless ``master_checks`` is
    false (Determined's own schema test cases predate them).
    """
    found = sorted(validator(schema_id).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    errors = [f"{format_path(e.absolute_path)}: {e.message}" for e in found]
    if master_checks and schema_id == EXPERIMENT:
        errors += master_errors(config)
    return errors

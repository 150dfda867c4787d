"""pyproject.toml's dependency ranges admit requirements.txt's pins, and name every pinned package."""

from __future__ import annotations

import tomllib
from packaging.requirements import Requirement

from conftest import ROOT


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            out[req.name.lower()] = str(req.specifier)
    return out


def test_every_pin_is_declared_and_admitted():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    ranges = {r.name.lower(): r.specifier for r in declared}
    for name, pin in pins().items():
        assert name in ranges, f"{name} is pinned in requirements.txt but not declared in pyproject.toml"
        if pin.startswith("=="):
            assert ranges[name].contains(pin[2:], prereleases=True), f"{name}{ranges[name]} excludes {pin}"


def test_the_installed_distribution_declares_them():
    from importlib.metadata import requires

    names = {Requirement(r).name.lower() for r in requires("det-mmdet") or []}
    assert {"mmdet", "mmengine", "mmcv", "determined", "torch"} <= names

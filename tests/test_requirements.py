"""What users install is declared once in substance: requirements.txt (ComfyUI-Manager,
comfy-cli) and pyproject.toml (the Registry, pip) list the same packages with the same floors,
and neither pins torch, which ComfyUI owns on a user's machine. CI's floors job installs
requirements.txt with every ``>=`` turned into ``==`` and runs the engine's tests on it."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

PACK_ROOT = Path(__file__).resolve().parent.parent


def _normal(line: str) -> str:
    """One requirement without spaces or comment, quotes unified, name lower-cased."""
    line = line.split("#", 1)[0].strip().replace('"', "'").replace(" ", "")
    name = re.match(r"[A-Za-z0-9_.-]+", line).group(0)
    return name.lower() + line[len(name):]


def _requirements_txt() -> set[str]:
    lines = (PACK_ROOT / "requirements.txt").read_text().splitlines()
    return {_normal(line) for line in lines if line.split("#", 1)[0].strip()}


def _pyproject() -> set[str]:
    project = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())["project"]
    return {_normal(dep) for dep in project["dependencies"]}


def test_requirements_and_pyproject_list_the_same_packages():
    assert _requirements_txt() == _pyproject()


def test_every_requirement_has_a_floor_and_none_is_torch():
    for req in _requirements_txt():
        assert ">=" in req, f"{req}: every requirement states its tested floor (>=)"
        assert not re.match(r"torch(vision|audio)?[<>=;]", req), f"{req}: ComfyUI owns torch"

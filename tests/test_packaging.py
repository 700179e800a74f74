"""pyproject lists packages explicitly (kernels/ installs as megatrain.kernels): every package folder
of megatrain/ must be in that list, or a non-editable install silently leaves it out."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"megatrain.kernels"} | {
        ".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "megatrain").rglob("__init__.py")}
    assert found - listed == set(), f"package folders missing from pyproject's packages: {sorted(found - listed)}"
    assert listed - found == set(), f"pyproject lists packages that do not exist: {sorted(listed - found)}"

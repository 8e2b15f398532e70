"""The code version covers every package the project installs."""

import tomllib
from pathlib import Path

from trainables import provenance

ROOT = Path(__file__).resolve().parents[2]


def test_code_version_hashes_every_installed_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installed = {p.rstrip("*") for p in config["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert installed == set(provenance.PACKAGES)
    hashed = {name.split("/", 1)[0] for name, _ in provenance._source_files()}
    assert hashed == installed

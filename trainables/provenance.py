"""Which corroprune is running: a version plus a hash of its own source, the same on every node."""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

PACKAGES = ("sweep", "trainables", "analysis", "deploy")
SOURCE_SUFFIXES = (".py", ".yaml")


def _source_files() -> list[tuple[str, Path]]:
    """(path relative to the install root, file) for every source file of the packages."""
    root = Path(__file__).resolve().parents[1]
    files = []
    for package in PACKAGES:
        for path in (root / package).rglob("*"):
            if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


@functools.cache
def code_version() -> str:
    """`<package version>+<12 hex digits of the source hash>`: equal exactly when the code is.

    Hashes the installed source itself, so an editable checkout, a wheel and a copy synced by
    the cluster launcher all compare by content, with or without git.
    """
    digest = hashlib.sha256()
    for name, path in _source_files():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        version = metadata.version("corroprune")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}+{digest.hexdigest()[:12]}"

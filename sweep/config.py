"""Presets: YAML files shipped in the package, read into a trial config plus sweep settings."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from trainables.config import TrialConfig, merge
from trainables.errors import UserError

PRESET_DIR = resources.files("sweep") / "presets"
# trial config, sweep settings, the fine-tuning search's and the budget search's own settings
SECTIONS = ("trial", "sweep", "search", "budget")


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in PRESET_DIR.iterdir() if p.name.endswith(".yaml")
    )


def load_preset(name: str) -> dict[str, Any]:
    """A shipped preset by name, or a YAML file by path; top-level keys `trial` and `sweep`."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
    else:
        shipped = PRESET_DIR / f"{name}.yaml"
        if not shipped.is_file():
            raise UserError(
                f"unknown preset '{name}'; shipped presets: {', '.join(preset_names())} "
                "(or give a path to a .yaml file)"
            )
        text = shipped.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"preset '{name}' is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"preset '{name}' must be a mapping with keys 'trial' and 'sweep'")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(
            f"unknown top-level key '{unknown[0]}' in preset '{name}'; allowed: "
            f"{', '.join(SECTIONS)}"
        )
    return raw


def trial_config(preset: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrialConfig:
    """The preset's trial section with overrides (nested dicts, e.g. from flags) applied."""
    return TrialConfig.from_dict(merge(preset.get("trial") or {}, overrides or {}))


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set optim.max_lr=0.02` flags into a nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE (e.g. optim.max_lr=0.02), got '{item}'")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out

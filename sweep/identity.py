"""What one trial is: its identity, its folder name and the results-table columns, defined once.

The grid names trial folders with it, the report and the dashboard read the facets back from it,
and `tune --select` filters on it. Adding an axis means adding one entry to `AXES` (and a field
to `TrialId`).

    sscs-fpn-dense-seed0              the dense base of (sscs, fpn) for seed 0
    sscs-fpn-agp-s0.9-seed1           AGP, element-wise (the paper), 90% sparsity, seed 1
    sscs-fpn-agp-channel-s0.9-seed1   the same pruner and sparsity, whole channels
    sscs-fpn-agp-coupled-s0.9-seed1   ... every channel, coupled channels together

Folders written before the seed axis have no `-seed<n>` suffix; they read as seed 0. The encoder
is one per sweep (it comes from the trial config), so it is part of the identity but not of the
name.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DENSE = "none"  # pruner (and granularity) of a dense, unpruned trial
ELEMENT, CHANNEL, COUPLED = "element", "channel", "coupled"
GRANULARITIES = (ELEMENT, CHANNEL, COUPLED)
STRUCTURED = (CHANNEL, COUPLED)  # the final model is cut slim


@dataclass(frozen=True)
class Axis:
    """One facet of a trial's identity: its field, its results-table column, the key
    `--select` takes, and how a text value (from a name or `--select`) becomes a value."""

    field: str
    column: str
    parse: Any = str
    in_name: bool = True


AXES = (
    Axis("dataset", "dataset"),
    Axis("model", "model"),
    Axis("encoder", "encoder", in_name=False),
    Axis("pruner", "pruner"),
    Axis("granularity", "granularity"),
    Axis("sparsity", "target_sparsity", parse=float),
    Axis("seed", "seed", parse=int),
)
COLUMNS = tuple(a.column for a in AXES)  # the results table's identity columns, in order
SELECT_KEYS = tuple(a.field for a in AXES)

_NAME = re.compile(
    r"^(?P<dataset>.+)-(?P<model>[^-]+)-"
    r"(?:dense|(?P<pruner>(?!(?:channel|coupled|element)-s)[^-]+)"
    r"(?:-(?P<granularity>channel|coupled|element))?-s(?P<sparsity>[0-9.]+))"
    r"(?:-seed(?P<seed>[0-9]+))?$"
)


def _sparsity(value: float) -> float:
    return round(float(value), 6)


@dataclass(frozen=True, order=True)
class TrialId:
    dataset: str
    model: str
    pruner: str = DENSE
    granularity: str = DENSE
    sparsity: float = 0.0
    seed: int = 0
    encoder: str | None = None

    def __post_init__(self) -> None:
        dense = self.pruner == DENSE
        object.__setattr__(self, "granularity", DENSE if dense else self.granularity)
        object.__setattr__(self, "sparsity", 0.0 if dense else _sparsity(self.sparsity))
        object.__setattr__(self, "seed", int(self.seed))
        if not dense and self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity {self.granularity!r}: expected one of {', '.join(GRANULARITIES)}"
            )

    @property
    def is_dense(self) -> bool:
        return self.pruner == DENSE

    @property
    def name(self) -> str:
        """The trial's folder name (its key within one run directory)."""
        if self.is_dense:
            kind = "dense"
        else:
            infix = "" if self.granularity == ELEMENT else f"-{self.granularity}"
            kind = f"{self.pruner}{infix}-s{self.sparsity:g}"
        return f"{self.dataset}-{self.model}-{kind}-seed{self.seed}"

    @property
    def base(self) -> TrialId:
        """The dense trial that warm-starts this one (and that its drop is measured against)."""
        return dataclasses.replace(self, pruner=DENSE)

    @property
    def combination(self) -> TrialId:
        """The identity without its seed: the cell that repeated seeds measure together."""
        return dataclasses.replace(self, seed=0)

    @classmethod
    def from_name(cls, name: str, encoder: str | None = None) -> TrialId:
        """Parse a folder name (with or without its seed suffix); ValueError if it is not one."""
        match = _NAME.match(name)
        if not match:
            raise ValueError(f"{name!r} is not a trial name (e.g. sscs-fpn-agp-s0.9-seed0)")
        pruner = match["pruner"] or DENSE
        return cls(
            dataset=match["dataset"],
            model=match["model"],
            pruner=pruner,
            granularity=match["granularity"] or ELEMENT,
            sparsity=float(match["sparsity"] or 0.0),
            seed=int(match["seed"] or 0),
            encoder=encoder,
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], fallback: TrialId | None = None) -> TrialId:
        """From a resolved trial config (config.yaml); what it lacks comes from `fallback`."""
        data, model, pruning = (config.get(k) or {} for k in ("data", "model", "pruning"))
        old = fallback or cls(dataset="", model="")
        pruner = pruning.get("pruner") or old.pruner
        sparsity = pruning.get("sparsity")
        seed = config.get("seed")
        return cls(
            dataset=data.get("dataset") or old.dataset,
            model=model.get("arch") or old.model,
            pruner=pruner,
            granularity=pruning.get("granularity")
            or (old.granularity if old.granularity != DENSE else ELEMENT),
            sparsity=old.sparsity if sparsity is None else float(sparsity),
            seed=old.seed if seed is None else int(seed),
            encoder=model.get("encoder") or old.encoder,
        )

    def columns(self) -> dict[str, Any]:
        """The identity as results-table columns (`sparsity` -> `target_sparsity`)."""
        return {a.column: getattr(self, a.field) for a in AXES}

    def matches(self, select: dict[str, Any]) -> bool:
        """True when every `--select` value equals this identity's (numbers compared as numbers)."""
        for key, value in select.items():
            mine = getattr(self, key)
            if isinstance(mine, float):
                if not math.isclose(mine, float(value)):
                    return False
            elif str(mine) != str(value):
                return False
        return True


def grid(
    datasets: Iterable[str],
    models: Iterable[str],
    granularities: Iterable[str],
    pruners: Iterable[str],
    sparsities: Iterable[float],
    seeds: Iterable[int],
) -> tuple[list[TrialId], list[TrialId]]:
    """Every dense base (per dataset, model and seed) and every pruned combination of a grid."""
    combos = list(itertools.product(granularities, pruners, sparsities))
    dense, pruned = [], []
    for dataset, model, seed in itertools.product(datasets, models, seeds):
        base = TrialId(dataset, model, seed=seed)
        dense.append(base)
        for granularity, pruner, sparsity in combos:
            pruned.append(
                dataclasses.replace(base, pruner=pruner, granularity=granularity, sparsity=sparsity)
            )
    return dense, pruned


def sweep_grid(sweep_file: dict[str, Any]) -> list[TrialId]:
    """The trials a run's `sweep.yaml` asks for (a grid without `granularities` is element-wise
    only, one without `seeds` runs its trial template's seed)."""
    axes = sweep_file.get("sweep") or {}
    seeds = axes.get("seeds")
    if seeds is None:
        seeds = [(sweep_file.get("trial") or {}).get("seed", 0)]
    dense, pruned = grid(
        axes.get("datasets") or [],
        axes.get("models") or [],
        axes.get("granularities") or [ELEMENT],
        axes.get("pruners") or [],
        [float(s) for s in axes.get("sparsities") or []],
        [int(s) for s in seeds],
    )
    return [*dense, *pruned]


def trial_id(name: str, config: dict[str, Any] | None = None) -> TrialId | None:
    """A trial folder's identity: its config first, its name second; None for a folder that is
    neither a trial name nor has a config that says what it is."""
    try:
        from_name: TrialId | None = TrialId.from_name(name)
    except ValueError:
        from_name = None
    if not config:
        return from_name
    identity = TrialId.from_config(config, from_name)
    return identity if identity.dataset and identity.model else from_name


def parse_select(text: str | None) -> dict[str, Any]:
    """`model=fpn,pruner=agp,sparsity=0.9,seed=1` -> {field: value}; a bad key or value is a
    ValueError that names it."""
    if not text:
        return {}
    axes = {a.field: a for a in AXES}
    out: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in axes or not value:
            raise ValueError(f"expected KEY=VALUE pairs with KEY one of {', '.join(SELECT_KEYS)}")
        try:
            out[key] = axes[key].parse(value)
        except ValueError:
            kind = {float: "a number", int: "an integer"}[axes[key].parse]
            raise ValueError(f"{key}={value}: expected {kind}") from None
    return out

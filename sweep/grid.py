"""The sweep's grid: dense base trials per (dataset, model), pruned trials per combination. No Ray."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep.identity import DENSE, grid
from trainables.config import ARCHS, DATASETS, GRANULARITIES, PRUNERS, TrialConfig, merge
from trainables.errors import UserError


@dataclass(frozen=True)
class SweepConfig:
    datasets: tuple[str, ...] = ("sscs", "nea")
    models: tuple[str, ...] = ARCHS
    pruners: tuple[str, ...] = ("lp", "agp", "mp")
    sparsities: tuple[float, ...] = (0.2, 0.5, 0.9)
    granularities: tuple[str, ...] = ("element",)  # element (the paper), channel, coupled
    # Training seeds: each trains its own dense base and its own pruned trials. None: the trial
    # template's `seed`. The train/val/test split does not depend on them (data.split_seed).
    seeds: tuple[int, ...] | None = None
    cpus_per_trial: float = 4
    gpus_per_trial: float = 1
    max_concurrent: int = 0  # 0: as many as resources allow
    max_failures: int = 2  # retries of a crashed trial, each from its own last checkpoint
    # After each trial, on its node: static INT8 ONNX of its final model, test mIoU and latency
    # beside the fp32 ones (sweep/deploy_step.py). Adds records, changes no result.
    deploy_int8: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any] | None) -> SweepConfig:
        config = dict(config or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise UserError(
                f"unknown sweep key '{unknown[0]}'; allowed: {', '.join(sorted(fields))}"
            )
        for key in ("datasets", "models", "pruners", "sparsities", "granularities", "seeds"):
            if key in config and config[key] is not None:
                value = config[key]
                config[key] = tuple(value.split(",") if isinstance(value, str) else value)
        cfg = cls(**config)
        _check_choices("datasets", cfg.datasets, DATASETS)
        _check_choices("models", cfg.models, ARCHS)
        _check_choices("pruners", cfg.pruners, tuple(p for p in PRUNERS if p != "none"))
        _check_choices("granularities", cfg.granularities, GRANULARITIES)
        try:
            cfg = dataclasses.replace(cfg, sparsities=tuple(float(s) for s in cfg.sparsities))
        except ValueError:
            raise UserError(f"sweep.sparsities {list(cfg.sparsities)}: expected numbers") from None
        if cfg.seeds is not None:
            try:
                seeds = tuple(int(s) for s in cfg.seeds)
            except (TypeError, ValueError):
                raise UserError(f"sweep.seeds {list(cfg.seeds)}: expected integers") from None
            if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
                raise UserError(
                    f"sweep.seeds {list(seeds)}: expected distinct integers >= 0, at least one"
                )
            cfg = dataclasses.replace(cfg, seeds=seeds)
        if not all(0 < s < 1 for s in cfg.sparsities):
            raise UserError(f"sweep.sparsities {cfg.sparsities}: each must be in (0, 1)")
        if not isinstance(cfg.deploy_int8, bool):
            raise UserError(f"sweep.deploy_int8 {cfg.deploy_int8!r}: expected true or false")
        if cfg.cpus_per_trial <= 0 or cfg.gpus_per_trial < 0 or cfg.max_concurrent < 0:
            raise UserError(
                "sweep: cpus_per_trial must be > 0, gpus_per_trial and max_concurrent >= 0"
            )
        return cfg


def _check_choices(key: str, values: tuple, allowed: tuple) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise UserError(f"sweep.{key} {list(values)}: allowed values are {', '.join(allowed)}")


@dataclass(frozen=True)
class TrialSpec:
    """One Ray trial: its name, resolved trial config, folder and (for pruned trials) its base."""

    name: str
    config: dict[str, Any]
    out_dir: str
    base: str | None = None  # the dense trial whose checkpoint warm-starts this one

    @property
    def warm_start(self) -> str | None:
        if self.base is None:
            return None
        return str(Path(self.out_dir).parent / self.base / "checkpoints" / "dense.pt")

    def as_param(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "warm_start": self.warm_start}


def _trial_config(
    template: dict[str, Any], dataset: str, roots: dict[str, str], **sections: Any
) -> dict:
    data: dict[str, Any] = {"dataset": dataset}
    if dataset != "folder":
        data["num_classes"] = None  # resolved from the dataset
    if dataset in roots:
        data["root"] = roots[dataset]
    elif dataset != "synthetic":
        raise UserError(f"dataset '{dataset}' needs a data root: --data-root {dataset}=/path")
    config = TrialConfig.from_dict(merge(template, {"data": data, **sections}))
    return absolute_paths(config).to_dict()


def absolute_paths(cfg: TrialConfig) -> TrialConfig:
    """Paths in a trial config made absolute against the driver's working directory: Ray runs
    each trial in a folder of its own choosing, where a relative path means something else."""
    weights = cfg.model.encoder_weights
    changes: dict[str, Any] = {}
    if weights is not None and weights != "imagenet":
        changes["model"] = {"encoder_weights": str(Path(weights).expanduser().resolve())}
    if cfg.data.root is not None:
        changes["data"] = {"root": str(Path(cfg.data.root).expanduser().resolve())}
    return cfg.replace(**changes) if changes else cfg


def seeds_of(sweep: SweepConfig, template: dict[str, Any]) -> tuple[int, ...]:
    """The sweep's training seeds: `sweep.seeds`, else the trial template's one seed."""
    return sweep.seeds if sweep.seeds is not None else (int(template.get("seed", 0)),)


def expand(
    sweep: SweepConfig, template: dict[str, Any], run_dir: Path, roots: dict[str, str]
) -> tuple[list[TrialSpec], list[TrialSpec]]:
    """Stage 1 (dense per dataset, model and seed) and stage 2 (every pruner and sparsity) trials."""
    trials_dir = Path(run_dir).resolve() / "trials"
    dense_ids, pruned_ids = grid(
        sweep.datasets,
        sweep.models,
        sweep.granularities,
        sweep.pruners,
        sweep.sparsities,
        seeds_of(sweep, template),
    )
    specs: dict[str, list[TrialSpec]] = {"dense": [], "pruned": []}
    for identity in [*dense_ids, *pruned_ids]:
        pruning = {"pruner": identity.pruner, "sparsity": identity.sparsity}
        if identity.pruner != DENSE:
            pruning["granularity"] = identity.granularity
        config = _trial_config(
            template,
            identity.dataset,
            roots,
            seed=identity.seed,
            model={"arch": identity.model},
            pruning=pruning,
        )
        base = None if identity.is_dense else identity.base.name
        spec = TrialSpec(identity.name, config, str(trials_dir / identity.name), base=base)
        specs["dense" if identity.is_dense else "pruned"].append(spec)
    return specs["dense"], specs["pruned"]


def parse_roots(values: list[str], datasets: tuple[str, ...]) -> dict[str, str]:
    """`--data-root sscs=/a nea=/b`, or one bare path when the sweep has one dataset."""
    roots: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            real = [d for d in datasets if d != "synthetic"]
            if len(real) != 1:
                raise UserError(
                    f"--data-root {value}: name the dataset (e.g. sscs={value}) when the sweep has several"
                )
            name, path = real[0], value
        if name not in DATASETS:
            raise UserError(
                f"--data-root {value}: unknown dataset '{name}'; allowed: {', '.join(DATASETS)}"
            )
        if not Path(path).is_dir():
            raise UserError(f"--data-root {value}: folder not found: {path}")
        roots[name] = str(Path(path).resolve())
    return roots

"""Typed, frozen configuration of one trial, read once from a raw dict (a preset or Ray's `config`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from trainables.errors import UserError

DATASETS = ("synthetic", "sscs", "nea", "folder")
ARCHS = ("unet", "unetplusplus", "fpn", "linknet", "manet")
PRUNERS = ("none", "lp", "agp", "mp", "magnitude")
GRANULARITIES = ("element", "channel", "coupled")
STRUCTURED = ("channel", "coupled")  # granularities whose final model is cut slim
SCOPES = ("layer", "global")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")
AUGMENT_PLACES = ("auto", "cpu", "device")
SSCS_VARIANTS = ("512x512", "original")
NUM_CLASSES = {"sscs": 4, "nea": 3}


@dataclass(frozen=True)
class SynthConfig:
    """The built-in synthetic corrosion set, generated on first use and cached on disk."""

    train: int = 64
    test: int = 16
    size: int = 128
    classes: int = 4
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"
    root: str | None = None  # SSCS / NEA / folder root; synthetic: cache folder (default: temp)
    num_classes: int | None = None  # None: the dataset's own (SSCS 4, NEA 3); needed for folder
    crop_size: int = 512  # training crop (padded first if the image is smaller)
    eval_pad_to: int = 32  # validation/test images are padded to a multiple of this
    resize: int | None = None  # longer side resized to this before anything else (None: keep)
    val_fraction: float = 0.2
    # Seed of the train/val split, apart from the trial's seed: repeated training seeds of a
    # sweep share one split, so they vary only the training (initialisation, augmentation, order).
    split_seed: int = 0
    sscs_variant: str = "512x512"
    nea_block_size: int = 10  # NEA frames are split into contiguous blocks of this many
    nea_test_fraction: float = 0.2
    # Blocks on either side of each test or validation block that no split uses, so near-duplicate
    # frames never sit in two splits (0: splits touch, as before)
    nea_guard_blocks: int = 1
    num_workers: int = 0
    # Decode (and resize) each image once per machine into $CORROPRUNE_CACHE/decoded, memory-mapped
    # by every loader worker and trial; false: decode on every access.
    cache: bool = True
    synthetic: SynthConfig = field(default_factory=SynthConfig)

    @property
    def classes(self) -> int:
        """Number of classes, resolved from the dataset where not given."""
        if self.num_classes is not None:
            return self.num_classes
        if self.dataset == "synthetic":
            return self.synthetic.classes
        return NUM_CLASSES.get(self.dataset, 0)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "fpn"
    encoder: str = "resnet101"
    encoder_weights: str | None = "imagenet"  # "imagenet", None, or a local .pt/.safetensors file


@dataclass(frozen=True)
class LossConfig:
    # Tversky: alpha weights false positives, beta false negatives. 0.3/0.7 follows the Tversky
    # paper's recommendation for imbalanced segmentation (rare corrosion classes: missing them
    # costs more than a false alarm). alpha = beta = 0.5 is Dice.
    alpha: float = 0.3
    beta: float = 0.7
    class_weights: tuple[float, ...] | None = None
    # Weight of an added cross-entropy term (0: the paper's pure Tversky). From scratch, without
    # ImageNet weights, pure Tversky sometimes stalls with background never predicted (measured
    # on the demo set); a little cross-entropy removes that. The demo preset uses it.
    ce_weight: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 4
    momentum: float = 0.5
    weight_decay: float = 0.0
    base_lr: float = 1e-4
    max_lr: float = 1e-2
    half_cycle_iters: int = 2000  # triangular CLR step_size_up (= step_size_down)


@dataclass(frozen=True)
class StagesConfig:
    train_epochs: int = 100
    prune_epochs: int = 50
    finetune_epochs: int = 100


@dataclass(frozen=True)
class PruningConfig:
    pruner: str = "none"
    # target fraction of prunable weights removed (granularity channel: of prunable channels)
    sparsity: float = 0.0
    initial_sparsity: float = 0.0
    steps: int = 5  # LP/AGP mask updates, evenly spaced through the prune stage
    # single weights; channels only one convolution reads; or coupled channel groups (residual
    # streams, skips, GroupNorm groups): the last two physically removable
    granularity: str = "element"
    # rank within each layer (coupled: each group loses the same fraction), or globally
    # (element and coupled only)
    scope: str = "layer"
    # module-name prefixes never pruned (coupled: their output channels are kept)
    exclude: tuple[str, ...] = ("segmentation_head",)
    mp_warmup_epochs: int = 20  # movement pruning: dense epochs at the start of the prune stage
    mp_cooldown_epochs: int = 10  # movement pruning: epochs at the target before fine-tuning
    # Coupled granularity, scope layer: how hard each stage is pruned relative to the others, by
    # stage name (`coupled.stage_of`: "encoder.stem", "encoder.layer1" ... "encoder.layer4",
    # "decoder"; `coupled.model_stages` lists a model's). Each coupled group drops
    # (its stage's ratio / the largest ratio) of the fraction a group of the largest ratio drops,
    # scaled so that `sparsity` is still reached (as closely as the ratios allow); ratio 0: never
    # pruned. Stages not named get ratio 1.0. None: every group drops the same fraction.
    stage_ratios: dict[str, float] | None = field(default=None, hash=False)  # cfg stays hashable
    # Fine-tune the model cut slim (true: the pruned channels physically removed when fine-tuning
    # starts, so its epochs run faster) or full-size with the masks in force (false); auto (None):
    # slim for the granularities that can be cut (channel, coupled), masked for element.
    slim_finetune: bool | None = None

    @property
    def finetunes_slim(self) -> bool:
        """Whether the fine-tuning stage runs on the model cut slim (`slim_finetune` resolved)."""
        if self.slim_finetune is None:
            return self.granularity in STRUCTURED
        return self.slim_finetune


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"
    threads: int | None = None  # torch threads (None: leave as is; Ray sets it from trial CPUs)
    progress: bool = True  # a progress bar per epoch when stderr is a terminal
    # Speed switches; "auto" (None) is what measured fastest on each device (BENCHMARKS.md):
    # on a GPU bf16 + channels-last + CUDA graphs (3.3x fp32 eager, FPN-R101), on a CPU all off.
    amp: bool | None = None  # bfloat16 autocast for the forward passes (no loss scaling needed)
    channels_last: bool | None = None  # NHWC memory format for model and inputs
    compile: str = "auto"  # torch.compile of the training forward: mode, "off" or "auto"
    # Where training images are augmented: "cpu" (albumentations in the loader workers), "device"
    # (uint8 batches, one affine warp per image on the training device), or "auto".
    augment: str = "auto"
    latency_repeats: int = 5  # final model's CPU latency runs recorded in final.json (0: skip)
    # checkpoints/last.pt (about 0.6 GB for a pruned FPN-ResNet-101) is written at the end of every
    # stage and after any epoch where one of these is due: every N epochs of a stage, or once
    # this much wall time has passed since the last write or the stage's start (None: that
    # cadence off). A resume re-runs the epochs since the last write (deterministic); a finished
    # trial deletes last.pt.
    checkpoint_every_epochs: int | None = None
    checkpoint_every_s: float | None = 600.0

    def resolve(self, device: str) -> RuntimeConfig:
        """A copy with every "auto" switch decided for `device` ("cpu" or "cuda")."""
        gpu = device == "cuda"
        return dataclasses.replace(
            self,
            amp=gpu if self.amp is None else self.amp,
            channels_last=gpu if self.channels_last is None else self.channels_last,
            compile=("reduce-overhead" if gpu else "off")
            if self.compile == "auto"
            else self.compile,
            augment=("device" if gpu else "cpu") if self.augment == "auto" else self.augment,
        )

    def checkpoint_due(self, epoch: int, epochs: int, seconds_since_write: float) -> bool:
        """Whether last.pt is written after `epoch` (1-based) of a stage of `epochs`."""
        every_n, every_s = self.checkpoint_every_epochs, self.checkpoint_every_s
        return (
            epoch == epochs
            or (every_n is not None and epoch % every_n == 0)
            or (every_s is not None and seconds_since_write >= every_s)
        )


@dataclass(frozen=True)
class TrialConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrialConfig:
        cfg = _build(cls, config, "")
        validate(cfg)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> TrialConfig:
        """A copy with some fields changed: `cfg.replace(pruning={"sparsity": 0.5})`."""
        return TrialConfig.from_dict(merge(self.to_dict(), sections))

    @property
    def pruned(self) -> bool:
        return self.pruning.pruner != "none"


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `override` wins. Neither input is modified."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, config: Any, where: str) -> Any:
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise UserError(
            f"config section '{where or 'top level'}' must be a mapping, got {config!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise UserError(
            f"unknown config key '{where}{unknown[0]}'; allowed keys here: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in config.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        nulls = ("none", "null", "auto") if set(args) == {bool, type(None)} else ("none", "null")
        is_none = value is None or (isinstance(value, str) and value.lower() in nulls)
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, got {value!r}")
        return {
            _coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}")
            for k, v in _dotted(value, key).items()
        }
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise UserError(f"config key '{key}' must be a number, got {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise UserError(f"config key '{key}' must be a number, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise UserError(f"config key '{key}' must be a whole number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str | int | float):
            raise UserError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    return value


def _dotted(mapping: dict, key: str, prefix: str = "") -> dict:
    """Nested mappings as one level of dotted keys: `--set pruning.stage_ratios.encoder.layer1=0`
    splits a stage name at its dots, and this joins it again."""
    out: dict = {}
    for k, v in mapping.items():
        name = f"{prefix}{k}"
        flat = _dotted(v, key, f"{name}.") if isinstance(v, dict) else {name: v}
        for n in flat:
            if n in out:
                raise UserError(f"config key '{key}' names {n!r} twice")
        out |= flat
    return out


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"config key '{key}' is {value!r}; allowed values: {', '.join(allowed)}")


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}' is {value!r}; expected {expected}")


def validate(cfg: TrialConfig) -> None:
    """Reject values that would fail later, naming the key and what is allowed."""
    d, m, p, o, s = cfg.data, cfg.model, cfg.pruning, cfg.optim, cfg.stages
    _choice("data.dataset", d.dataset, DATASETS)
    _choice("data.sscs_variant", d.sscs_variant, SSCS_VARIANTS)
    _choice("model.arch", m.arch, ARCHS)
    _choice("pruning.pruner", p.pruner, PRUNERS)
    _choice("pruning.granularity", p.granularity, GRANULARITIES)
    _choice("pruning.scope", p.scope, SCOPES)
    _choice("runtime.device", cfg.runtime.device, DEVICES)
    _choice("runtime.compile", cfg.runtime.compile, COMPILE_MODES)
    _choice("runtime.augment", cfg.runtime.augment, AUGMENT_PLACES)
    if d.dataset == "synthetic":
        syn = d.synthetic
        _check(syn.classes in (3, 4), "data.synthetic.classes", syn.classes, "3 or 4")
        _check(syn.train >= 2, "data.synthetic.train", syn.train, "at least 2 (train and val)")
        _check(syn.test >= 1, "data.synthetic.test", syn.test, "at least 1")
        _check(syn.size >= 32, "data.synthetic.size", syn.size, "at least 32 pixels")
    expected = d.synthetic.classes if d.dataset == "synthetic" else NUM_CLASSES.get(d.dataset)
    if d.num_classes is not None and expected is not None:
        _check(
            d.num_classes == expected,
            "data.num_classes",
            d.num_classes,
            f"{expected} for dataset '{d.dataset}' (or leave it unset)",
        )
    _check(
        d.classes >= 2,
        "data.num_classes",
        d.num_classes,
        "at least 2 (required for dataset 'folder')",
    )
    _check(
        d.crop_size > 0 and d.crop_size % 32 == 0, "data.crop_size", d.crop_size, "a multiple of 32"
    )
    _check(
        d.eval_pad_to > 0 and d.eval_pad_to % 32 == 0,
        "data.eval_pad_to",
        d.eval_pad_to,
        "a multiple of 32",
    )
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "between 0 and 1")
    _check(
        0.0 < d.nea_test_fraction < 1.0,
        "data.nea_test_fraction",
        d.nea_test_fraction,
        "between 0 and 1",
    )
    _check(d.nea_block_size >= 1, "data.nea_block_size", d.nea_block_size, "at least 1")
    _check(d.nea_guard_blocks >= 0, "data.nea_guard_blocks", d.nea_guard_blocks, "0 or more")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "0 or more")
    r = cfg.runtime
    _check(r.latency_repeats >= 0, "runtime.latency_repeats", r.latency_repeats, "0 or more")
    _check(
        r.checkpoint_every_epochs is None or r.checkpoint_every_epochs >= 1,
        "runtime.checkpoint_every_epochs",
        r.checkpoint_every_epochs,
        "none or at least 1 (1: every epoch)",
    )
    _check(
        r.checkpoint_every_s is None or r.checkpoint_every_s >= 0,
        "runtime.checkpoint_every_s",
        r.checkpoint_every_s,
        "none or 0 or more seconds (0: every epoch)",
    )
    _check(d.resize is None or d.resize >= 32, "data.resize", d.resize, "none or at least 32")
    _check(o.batch_size >= 1, "optim.batch_size", o.batch_size, "at least 1")
    _check(0.0 <= o.momentum < 1.0, "optim.momentum", o.momentum, "in [0, 1)")
    _check(0.0 < o.base_lr <= o.max_lr, "optim.base_lr", o.base_lr, f"in (0, max_lr={o.max_lr}]")
    _check(o.half_cycle_iters >= 1, "optim.half_cycle_iters", o.half_cycle_iters, "at least 1")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "0 or more")
    _check(
        cfg.loss.alpha >= 0 and cfg.loss.beta >= 0, "loss.alpha", cfg.loss.alpha, "alpha, beta >= 0"
    )
    _check(cfg.loss.alpha + cfg.loss.beta > 0, "loss.beta", cfg.loss.beta, "alpha + beta > 0")
    _check(cfg.loss.ce_weight >= 0, "loss.ce_weight", cfg.loss.ce_weight, "0 or more")
    if cfg.loss.class_weights is not None:
        _check(
            len(cfg.loss.class_weights) == d.classes,
            "loss.class_weights",
            cfg.loss.class_weights,
            f"{d.classes} weights, one per class",
        )
    for key in ("train_epochs", "prune_epochs", "finetune_epochs"):
        _check(getattr(s, key) >= 0, f"stages.{key}", getattr(s, key), "0 or more")
    _check(0.0 <= p.sparsity < 1.0, "pruning.sparsity", p.sparsity, "in [0, 1)")
    _check(
        0.0 <= p.initial_sparsity <= p.sparsity or not cfg.pruned,
        "pruning.initial_sparsity",
        p.initial_sparsity,
        f"in [0, sparsity={p.sparsity}]",
    )
    _check(
        p.granularity != "channel" or p.scope == "layer",
        "pruning.scope",
        p.scope,
        "'layer' with pruning.granularity 'channel' (every layer keeps its share of channels); "
        "for a global ranking of channels use pruning.granularity 'coupled'",
    )
    _check(
        not (cfg.pruned and p.slim_finetune and p.granularity not in STRUCTURED),
        "pruning.slim_finetune",
        p.slim_finetune,
        f"false or auto with pruning.granularity {p.granularity!r} (single weights cannot be "
        f"cut out; only {' and '.join(STRUCTURED)} pruning fine-tunes slim)",
    )
    _check_stage_ratios(p, cfg.pruned)
    if cfg.pruned:
        _check(p.sparsity > 0, "pruning.sparsity", p.sparsity, "above 0 when a pruner is set")
        _check(s.prune_epochs >= 1, "stages.prune_epochs", s.prune_epochs, "at least 1 to prune")
        if p.pruner in ("lp", "agp", "magnitude"):
            _check(p.steps >= 1, "pruning.steps", p.steps, "at least 1")
            _check(
                s.prune_epochs % p.steps == 0,
                "stages.prune_epochs",
                s.prune_epochs,
                f"a multiple of pruning.steps={p.steps} (a mask update every prune_epochs/steps)",
            )
        if p.pruner == "mp":
            ramp = s.prune_epochs - p.mp_warmup_epochs - p.mp_cooldown_epochs
            _check(
                p.mp_warmup_epochs >= 0 and p.mp_cooldown_epochs >= 0 and ramp >= 1,
                "pruning.mp_warmup_epochs",
                p.mp_warmup_epochs,
                f"warm-up + cool-down ({p.mp_cooldown_epochs}) leaving at least one ramp epoch "
                f"in stages.prune_epochs={s.prune_epochs}",
            )


def _check_stage_ratios(p: PruningConfig, pruned: bool) -> None:
    """Ratios are finite, 0 or more, one above 0; and need coupled layer pruning (a dense trial,
    such as a sweep's base, ignores them)."""
    if p.stage_ratios is None:
        return
    for name, ratio in p.stage_ratios.items():
        _check(
            math.isfinite(ratio) and ratio >= 0,
            f"pruning.stage_ratios.{name}",
            ratio,
            "a finite number, 0 or more (0: the stage is never pruned)",
        )
    _check(
        any(r > 0 for r in p.stage_ratios.values()),
        "pruning.stage_ratios",
        p.stage_ratios,
        "at least one ratio above 0, or none (every coupled group pruned alike)",
    )
    _check(
        not pruned or (p.granularity == "coupled" and p.scope == "layer"),
        "pruning.stage_ratios",
        p.stage_ratios,
        f"none with pruning.granularity {p.granularity!r} and pruning.scope {p.scope!r}; "
        "per-stage ratios need pruning.granularity 'coupled' and pruning.scope 'layer'",
    )

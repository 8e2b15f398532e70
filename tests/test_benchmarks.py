"""The training and loader benchmarks measure the project's own step and pipeline, on tiny inputs."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_train() -> ModuleType:
    return load("bench_train")


@pytest.fixture(scope="module")
def bench_loader() -> ModuleType:
    return load("bench_loader")


def train_args(**overrides: object) -> argparse.Namespace:
    base = {"encoder": "tu-test_resnet", "size": 32, "batch": 2, "classes": 4, "steps": 2}
    return argparse.Namespace(**{**base, "warmup": 1, **overrides})


def test_variants_measured_from_the_same_start(bench_train: ModuleType) -> None:
    args, device = train_args(), torch.device("cpu")
    batch = bench_train.random_batch(args, device)
    fp32 = bench_train.measure("fpn", "fp32", batch, args, device)
    fast = bench_train.measure("fpn", "bf16+channels_last", batch, args, device)
    for result in (fp32, fast):
        assert result["images_per_s"] > 0 and math.isfinite(result["last_loss"])
    assert fast["last_loss"] == pytest.approx(fp32["last_loss"], abs=0.02)  # same seed, same data
    row = bench_train.format_row(fast, fp32)
    assert row.startswith("| fpn | bf16+channels_last |") and row.count("|") == 9
    warped = bench_train.measure("fpn", "fp32+device-augment", batch, args, device)
    assert warped["images_per_s"] > 0 and math.isfinite(warped["last_loss"])


def test_variant_list_puts_the_baseline_first(
    bench_train: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = argparse.ArgumentParser()
    names = bench_train.variant_list(argparse.Namespace(variants="bf16", compile=False), parser)
    assert names == ["fp32", "bf16"]
    all_names = bench_train.variant_list(argparse.Namespace(variants=None, compile=True), parser)
    assert all_names[0] == "fp32" and "bf16+channels_last+cudagraphs" in all_names
    eager = bench_train.variant_list(argparse.Namespace(variants=None, compile=False), parser)
    assert all(bench_train.VARIANTS[n].compile == "off" for n in eager)
    monkeypatch.setattr(sys, "stderr", sys.stdout)
    with pytest.raises(SystemExit):
        bench_train.variant_list(argparse.Namespace(variants="fp16", compile=False), parser)


def test_trajectory_config_is_a_valid_train_only_trial(
    bench_train: ModuleType, tmp_path: Path
) -> None:
    args = train_args(trajectory=3, train_images=8, test_images=2, workers=0, threads=None)
    cfg = bench_train.trajectory_config(
        "fpn", "bf16+channels_last", args, torch.device("cpu"), tmp_path
    )
    assert (cfg.runtime.amp, cfg.runtime.channels_last) == (True, True)
    assert (cfg.stages.train_epochs, cfg.stages.prune_epochs, cfg.stages.finetune_epochs) == (
        3,
        0,
        0,
    )
    assert cfg.loss.ce_weight == 0.5 and cfg.optim.max_lr == 0.05
    assert cfg.model.encoder_weights is None and cfg.data.crop_size == 32


@pytest.mark.parametrize("augment", ["cpu", "device"])
def test_loader_augmentations_do_not_depend_on_workers(
    bench_loader: ModuleType, tmp_path: Path, augment: str
) -> None:
    args = argparse.Namespace(
        images=10, size=64, batch=4, batches=0, check_batches=1, check_workers=2
    )
    cfg = bench_loader.data_config(args, tmp_path / "synthetic")
    check = bench_loader.check_augmentations(cfg, args, augment)
    assert check["images"] == 4
    assert check["identical_across_worker_counts"] is True
    assert check["identical_across_epochs"] < check["images"]
    shares = check["shares"]
    assert shares["images"] == 8 and shares["untouched"] + shares["flipped_only"] <= 8
    loader = bench_loader.make_loader(bench_loader.train_set(cfg, augment), 4, train=True, seed=0)
    seconds, seen = bench_loader.epoch_pass(loader, 1, args)
    assert seen == 8 and seconds > 0  # 8 train images, batches of 4, last batch dropped


def test_pruning_overhead_times_both_steps_alternately() -> None:
    bench_pruning = load("bench_pruning")
    args = argparse.Namespace(
        encoder="tu-test_resnet", size=32, batch=2, warmup=1, repeats=2, device=torch.device("cpu")
    )
    times = bench_pruning.step_times("linknet", args)
    assert times["dense"] > 0 and times["masked"] > 0 and 0 < times["hooks"] < times["masked"]
    extra = times["accumulator_bytes"]
    stepper = bench_pruning.Stepper("linknet", args, pruned=True)
    params = stepper.pruner.masks.params.values()
    assert extra == 4 * sum(p.numel() for p in params)  # a float32 accumulator per prunable weight
    pruned = sum(int((~m).sum()) for m in stepper.pruner.masks.masks.values())
    assert pruned == sum(round(0.5 * p.numel()) for p in params)  # 50 %, layer by layer


def test_checkpoint_traffic_counts_a_trials_own_last_checkpoint_writes(tmp_path: Path) -> None:
    bench_checkpoint = load("bench_checkpoint")
    sizes = bench_checkpoint.measure_sizes("tu-test_resnet", tmp_path)
    train, prune, finetune = (sizes[stage][0] for stage in ("train", "prune", "finetune"))
    assert 0 < train < finetune < prune  # + masks; + a float32 score per prunable weight
    plan, unit = [("prune", 50), ("finetune", 100)], {"prune": 1, "finetune": 1}
    every_epoch = bench_checkpoint.trial_traffic(plan, unit, 24.0, bench_checkpoint.EVERY_EPOCH)
    assert every_epoch == (150, 150)  # 150 epochs of 24 s: one hour
    # every 600 s: prune epochs 25 and 50, fine-tuning 25, 50, 75 and 100
    default = bench_checkpoint.trial_traffic(plan, unit, 24.0, bench_checkpoint.RuntimeConfig())
    assert default == (6, 6)


def test_seed_spread_from_a_multi_seed_run(tmp_path: Path, capsys) -> None:
    """bench_seeds reads a run through the report's tables: spreads, seeds needed, claims."""
    import json
    import shutil

    import yaml

    from tests.analysis.fake_run import write_fake_run

    run = write_fake_run(tmp_path / "run", datasets=("synthetic",))
    trials = run / "trials"
    for trial in sorted(trials.iterdir()):
        for seed, shift in ((1, 0.01), (2, -0.01)):
            copy = trials / f"{trial.name}-seed{seed}"
            shutil.copytree(trial, copy)
            config = yaml.safe_load((copy / "config.yaml").read_text())
            (copy / "config.yaml").write_text(yaml.safe_dump({**config, "seed": seed}))
            final = copy / "final.json"
            if final.exists():
                data = json.loads(final.read_text())
                if data.get("pruned"):
                    data["pruned"]["test_miou"] += shift
                final.write_text(json.dumps(data))
    assert load("bench_seeds").main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "seeds 0, 1, 2" in out and "| drop from own seed's dense (paired) |" in out
    assert "| 0.0100 |" in out and "| FPN and LinkNet hold IoU best | synthetic |" in out

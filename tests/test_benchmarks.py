"""The benchmarks measure the project's own step, pipeline, pruned models and runtimes, on tiny inputs."""

from __future__ import annotations

import argparse
import importlib.util
import json
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


# ---- deployable speed: coupled pruning against Torch-Pruning, three runtimes --------------------


@pytest.fixture(scope="module")
def bench_coupled() -> ModuleType:
    return load("bench_coupled")


@pytest.fixture(scope="module")
def bench_proxy() -> ModuleType:
    return load("bench_proxy")


def test_coupled_bench_arguments(
    bench_coupled: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = bench_coupled.parse_args(["--archs", "all"])
    assert every.archs == ["unet", "unetplusplus", "fpn", "linknet", "manet"]
    assert every.runtimes == ["torch", "onnx", "onnx-int8"]
    assert bench_coupled.parse_args(["--arch", "manet"]).archs == ["manet"]  # the old option
    monkeypatch.setattr(sys, "stderr", sys.stdout)
    with pytest.raises(SystemExit):
        bench_coupled.parse_args(["--runtimes", "torch,tensorrt"])


def test_coupled_bench_times_each_model_through_three_runtimes(
    bench_coupled: ModuleType, capsys
) -> None:
    args = bench_coupled.parse_args(
        ["--archs", "fpn", "--encoder", "tu-test_resnet", "--size", "64", "64"]
        + ["--channel-sparsities", "", "--coupled-sparsities", "", "--tp-ratios", "0.5"]
        + ["--repeats", "2", "--threads", "1", "--calibration-images", "1"]
    )
    rows = bench_coupled.comparison("fpn", args)
    dense, tp_row, matched = rows
    assert (dense["model"], tp_row["model"]) == ("dense", "Torch-Pruning ratio 0.5")
    assert matched["model"].endswith("(params of TP 0.5)")
    for row in rows:
        assert set(row["latency"]) == {"torch", "onnx", "onnx-int8"}
        assert all(0 < p50 <= p90 for p50, p90 in row["latency"].values())
    # coupled at Torch-Pruning's size: within one coupled unit of its count, far below dense
    assert abs(matched["params"] - tp_row["params"]) < 0.05 * tp_row["params"]
    assert tp_row["params"] < 0.5 * dense["params"] and tp_row["gmacs"] < dense["gmacs"]
    bench_coupled.print_table(rows, args.runtimes)
    lines = capsys.readouterr().out.splitlines()
    assert "| ORT INT8 ms p50 / p90 (speed-up) |" in lines[0] and len(lines) == 2 + len(rows)
    assert lines[2].startswith("| dense | 0.000 |") and "(1.00x)" in lines[2]


def test_torch_pruning_model_reloads_from_its_history(
    bench_proxy: ModuleType, tmp_path: Path
) -> None:
    from trainables.config import TrialConfig
    from trainables.models import build_model

    cfg = TrialConfig.from_dict(
        {"model": {"arch": "fpn", "encoder": "tu-test_resnet", "encoder_weights": None}}
    )
    model = build_model(cfg.model, 4).eval()
    pruner, _ = bench_proxy.tp_pruner(model, bench_proxy.tp.importance.MagnitudeImportance(), 0.5)
    pruner.step()
    run = bench_proxy.TpRun(model, bench_proxy.plain_history(pruner), 0.0)
    bench_proxy.save_tp(run, cfg, 0.5, tmp_path / "tp.pt")
    loaded, _ = bench_proxy.load_tp(tmp_path / "tp.pt")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert bench_proxy.params_of(loaded) == bench_proxy.tp_params(build_model(cfg.model, 4), 0.5, 1)


def proxy_record(method: str, sparsity: float, ms: float, miou: float, **extra) -> dict:
    latency = {r: [ms, ms] for r in ("torch", "onnx", "onnx-int8")}
    return {
        "seed": 0,
        "method": method,
        "sparsity": sparsity,
        "params": 1,
        "gmacs": 1.0,
        "counted_kept": 1,
        "ratio": 0.3,
        "latency": latency,
        "miou": {"torch": miou, "onnx": miou, "onnx-int8": miou - 0.01},
        **extra,
    }


def test_matched_latency_interpolates_torch_prunings_curve(bench_proxy: ModuleType) -> None:
    models = [
        proxy_record("dense", 0.0, 100.0, 0.80),
        proxy_record("tp", 0.5, 50.0, 0.70),
        proxy_record("tp", 0.9, 25.0, 0.50),
        proxy_record("coupled", 0.5, 40.0, 0.72),  # TP at 40 ms: 0.5 + 15/25 * 0.2 = 0.62
        proxy_record("coupled", 0.9, 20.0, 0.45),  # faster than any Torch-Pruning model
    ]
    lines = bench_proxy.matched_table({"models": models})
    torch_row = next(line for line in lines if line.startswith("| 0.5 | torch |"))
    assert "| 0.620 ± 0.000 | 0.100 ± 0.000 | 1/1 |" in torch_row
    int8_row = next(line for line in lines if line.startswith("| 0.5 | ORT INT8 |"))
    assert "| 0.710 ± 0.000 | 0.610 ± 0.000 | 0.100 ± 0.000 |" in int8_row  # INT8 against INT8
    assert next(line for line in lines if line.startswith("| 0.9 | torch |")).endswith("| 0/1 |")


def test_proxy_accuracy_and_latency_passes(bench_proxy: ModuleType, tmp_path: Path) -> None:
    """One seed, one sparsity, two epochs a stage: every model scored through torch, ONNX fp32
    and INT8, Torch-Pruning reloaded from its history, then the latency pass on the files."""
    out = tmp_path / "results.json"
    argv = ["--out", str(out), "--seeds", "0", "--sparsities", "0.5", "--encoder"]
    argv += ["tu-test_resnet", "--size", "32", "--train-images", "8", "--test-images", "2"]
    argv += ["--train-epochs", "2", "--prune-epochs", "2", "--finetune-epochs", "2", "--steps"]
    argv += ["2", "--taylor-batches", "1", "--calibration-images", "2", "--threads", "1"]
    assert bench_proxy.main(argv) == 0
    models = {m["method"]: m for m in json.loads(out.read_text())["models"]}
    assert set(models) == {"dense", "coupled", "tp"}
    coupled, tp_model = models["coupled"], models["tp"]
    assert coupled["miou"]["torch"] == pytest.approx(coupled["trial_miou"], abs=1e-6)
    for m in models.values():
        assert m["miou"]["onnx"] == pytest.approx(m["miou"]["torch"], abs=0.01)
        assert 0 <= m["miou"]["onnx-int8"] <= 1 and m["int8_agreement"] >= 0.8
    dense = bench_proxy.dense_model(
        bench_proxy.base_config(bench_proxy.parse_args(argv), 0),
        tmp_path / models["dense"]["files"]["torch"],
    )
    assert tp_model["params"] == bench_proxy.tp_params(dense, tp_model["ratio"], 2)
    assert tp_model["params"] < models["dense"]["params"]
    latency_argv = ["--latency-from", str(out), "--repeats", "1", "--threads", "1"]
    assert bench_proxy.main(latency_argv) == 0
    table = (tmp_path / "table-32.md").read_text()
    assert "| dense | 0.000 |" in table and "| 0.5 | ORT INT8 |" in table
    timed = json.loads((tmp_path / "latency-32.json").read_text())["models"]
    assert all(set(m["latency"]) == {"torch", "onnx", "onnx-int8"} for m in timed)


def test_budget_bench_presets_and_table() -> None:
    from sweep.budget import settings_from
    from trainables.config import TrialConfig

    bench = load("bench_budget")
    args = bench.parse_args(["--out", "unused"])
    budget = settings_from(bench.budget_preset(args), 10.0, "onnx", 1, None)
    assert budget.finetune_epochs == "sweep" and budget.over_budget_margin == 0
    assert budget.latency_floor and budget.startup_trials == 3
    preset = bench.sweep_preset(args, seed=2)
    cfg = TrialConfig.from_dict(preset["trial"])
    assert cfg.seed == 2 and cfg.stages.finetune_epochs == 4 and cfg.data.synthetic.test == 32

    def row(seed: int, delta: float, ms: float) -> dict:
        side = {"test_miou": 0.7, "latency_ms": 10.0, "sparsity": 0.7}
        return {
            "seed": seed,
            "budget_ms": 11.0,
            "chosen": {**side, "test_miou": 0.7 + delta, "latency_ms": ms},
            "best_uniform": side,
            "delta_test_miou": delta,
            "finetune_epochs": {"search": 24, "sweep": 24},
            "configurations": {
                "search": 9,
                "search_within_budget": 6,
                "sweep": 6,
                "sweep_within_budget": 3,
            },
        }

    text = bench.table([row(0, 0.02, 9.0), row(1, 0.04, 11.0)], "onnx")
    assert (
        "| 0 | 11.0 | 0.720 / 9.0 / 0.70 | 0.700 / 10.0 / 0.70 | +0.020 | 24 / 24 | 6 / 9; 3 / 6 |"
        in text
    )
    assert "over 2 seeds: Δ test mIoU mean +0.030 (sd 0.014" in text
    assert "latency / the uniform model's: mean 1.00" in text

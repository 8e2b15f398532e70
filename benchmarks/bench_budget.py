"""The budget search against the sweep it starts from: is its model more accurate under the budget?

    python benchmarks/bench_budget.py --out runs/budget [--seeds 0,1,2,3,4] [--arch fpn]
        [--encoder resnet18] [--size 128] [--train-images 64] [--test-images 32]
        [--train-epochs 12] [--prune-epochs 4] [--finetune-epochs 4]
        [--sparsities 0.3,0.5,0.7,0.8,0.9,0.95] [--samples 24] [--budget-fraction 0.4]
        [--runtime onnx] [--threads 1] [--repeats 20] [--max-concurrent 2]

Per seed, in `--out`/seed<S>/, with the commands users run (`corroprune sweep`, then `corroprune
tune --preset budget-search`), on the built-in synthetic set:

1. a plain sweep: one dense model, then one uniform-ratio coupled AGP trial per `--sparsities`
   value (every coupled group loses the same fraction of its channels; the sweep's layer scope);
2. the budget: `--budget-fraction` of the dense model's latency, measured once here (batch 1, the
   test images' size, `--runtime` with `--threads`) once the sweep's Ray has exited and the
   1-minute load is under half the cores (the search command starts on the same condition);
3. the budget search from that sweep, its fine-tuning epochs in all capped at the sweep's
   (`budget.finetune_epochs: sweep`): each configuration within budget is fine-tuned for the
   sweep's epochs, one over budget stops before fine-tuning and spends none, and the search
   ends when the next configuration would spend more than the sweep did (or after `--samples`
   configurations). A configuration is over budget as soon as its slim model times over it
   (`over_budget_margin: 0`: only a model under the budget can be chosen), and Optuna ranks the
   models under the budget by validation mIoU alone (`latency_floor`, the preset's default).

`--retime` (after a run, same `--out`): every sweep model and chosen model timed again, each seed's
in a fresh process (all exported, then timed in interleaved rounds), and the comparison redone
with those latencies; writes `--out`/retimed.json.

Compared: the search's chosen model (best validation mIoU under the budget) against the sweep's
best uniform-ratio model under the same budget (chosen the same way, on validation), both on the
test split, with their latencies as the search measured them. Writes `--out`/results.json and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--arch", default="fpn")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--train-images", type=int, default=64)
    p.add_argument("--test-images", type=int, default=32)
    p.add_argument("--train-epochs", type=int, default=12)
    p.add_argument("--prune-epochs", type=int, default=4)
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--sparsities", default="0.3,0.5,0.7,0.8,0.9,0.95")
    p.add_argument(
        "--samples", type=int, default=24, help="most search configurations (epochs end it first)"
    )
    p.add_argument("--budget-fraction", type=float, default=0.4)
    p.add_argument("--runtime", default="onnx")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument(
        "--retime",
        action="store_true",
        help="time a finished run's models again, each seed in a fresh process; redo the comparison",
    )
    return p.parse_args(argv)


def sweep_preset(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    half_cycle = max(1, args.prune_epochs * args.train_images // 8 // 2)  # prune stage: 1 cycle
    return {
        "trial": {
            "seed": seed,
            "data": {
                "dataset": "synthetic",
                "crop_size": args.size,
                "synthetic": {
                    "train": args.train_images,
                    "test": args.test_images,
                    "size": args.size,
                    "classes": 4,
                    "seed": 0,
                },
            },
            "model": {"arch": args.arch, "encoder": args.encoder, "encoder_weights": None},
            "loss": {"alpha": 0.3, "beta": 0.7, "ce_weight": 0.5},
            "optim": {"batch_size": 8, "max_lr": 0.05, "half_cycle_iters": half_cycle},
            "stages": {
                "train_epochs": args.train_epochs,
                "prune_epochs": args.prune_epochs,
                "finetune_epochs": args.finetune_epochs,
            },
            "pruning": {"steps": args.prune_epochs},
            "runtime": {"device": "cpu", "latency_repeats": 0},
        },
        "sweep": {
            "datasets": ["synthetic"],
            "models": [args.arch],
            "pruners": ["agp"],
            "granularities": ["coupled"],
            "sparsities": [float(s) for s in args.sparsities.split(",")],
            "cpus_per_trial": 1,
            "gpus_per_trial": 0,
            "max_concurrent": args.max_concurrent,
        },
    }


def budget_preset(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "budget": {
            "samples": args.samples,
            "finetune_epochs": "sweep",
            # Only a model under the budget can be chosen: none over it is worth fine-tuning.
            "over_budget_margin": 0.0,
            "seed": 0,
            "repeats": args.repeats,
            # The sweep's trials count as finished ones: TPE models from the first proposal.
            "startup_trials": len(args.sparsities.split(",")) // 2,
            "pruners": ["agp"],
            "sparsity": {"low": 0.3, "high": 0.95},
        },
        "sweep": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": args.max_concurrent},
    }


def corroprune(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "sweep.cli", *argv]
    print("$ corroprune " + " ".join(argv), flush=True)
    return subprocess.run(cmd, env=env, text=True, capture_output=True)


def wait_quiet(limit_s: float = 240) -> float:
    """Until the last command's Ray has exited and the 1-minute load is under half the cores
    (at most `limit_s`): the next timings are then taken on a quiet machine. Returns the load."""
    deadline = time.monotonic() + limit_s
    cores = os.cpu_count() or 1
    while time.monotonic() < deadline:
        ray_left = any(
            b"raylet" in cmd or b"gcs_server" in cmd
            for cmd in (_cmdline(p) for p in Path("/proc").iterdir() if p.name.isdigit())
        )
        if not ray_left and os.getloadavg()[0] < 0.5 * cores:
            break
        time.sleep(2)
    return os.getloadavg()[0]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def dense_latency(run: Path, args: argparse.Namespace) -> float:
    """The sweep's dense model, timed as the search times every model."""
    from deploy.artefacts import load_artefact
    from deploy.timing import TimingSetup, prepare, time_rounds

    final = next((run / "trials").glob("*-dense-seed*")) / "checkpoints" / "final.pt"
    source = load_artefact(final)
    setup = TimingSetup(args.runtime, (args.size, args.size), args.threads, args.repeats)
    runner = prepare(source.model, source.cfg, setup, run / "dense-timing")
    return time_rounds({"dense": runner}, setup)["dense"]["latency_ms"]


def finetune_epochs(trial_dirs: list[Path]) -> int:
    from trainables.checkpoint import read_jsonl

    return sum(
        sum(1 for r in read_jsonl(d / "metrics.jsonl") if r.get("stage") == "finetune")
        for d in trial_dirs
    )


def one_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    folder = (args.out / f"seed{seed}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    sweep_yaml, budget_yaml = folder / "sweep-preset.yaml", folder / "budget-preset.yaml"
    sweep_yaml.write_text(yaml.safe_dump(sweep_preset(args, seed)))
    budget_yaml.write_text(yaml.safe_dump(budget_preset(args)))
    run, search = folder / "sweep", folder / "search"
    started = time.perf_counter()
    done = corroprune("sweep", "--preset", str(sweep_yaml), "--out", str(run))
    if done.returncode != 0:
        raise SystemExit(f"the sweep failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    sweep_s = time.perf_counter() - started
    load_before_budget = wait_quiet()
    budget = round(args.budget_fraction * dense_latency(run, args), 3)
    load_before_search = wait_quiet()
    started = time.perf_counter()
    done = corroprune(
        *("tune", "--preset", str(budget_yaml), "--from", str(run), "--out", str(search)),
        *("--budget-ms", str(budget), "--runtime", args.runtime, "--threads", str(args.threads)),
    )
    search_s = time.perf_counter() - started
    print(done.stdout[-1500:], done.stderr[-1500:], flush=True)
    results = json.loads((search / "results.json").read_text())
    chosen, base = results["chosen"], results["best_baseline_within_budget"]
    pruned = [d for d in (run / "trials").iterdir() if "-dense-" not in d.name]
    return {
        "seed": seed,
        "budget_ms": budget,
        "chosen": chosen,
        "best_uniform": base,
        "delta_test_miou": (chosen["test_miou"] - base["test_miou"] if chosen and base else None),
        "search_statuses": [t["status"] for t in results["trials"]],
        "configurations": {
            "search": len(results["trials"]),
            "search_within_budget": sum(t["within_budget"] for t in results["trials"]),
            "sweep": len(pruned),
            "sweep_within_budget": sum(
                b["within_budget"] for b in results["baselines"] if b["pruner"] != "none"
            ),
        },
        "finetune_epochs": {
            "sweep": finetune_epochs(pruned),
            "search": finetune_epochs([Path(t["out_dir"]) for t in results["trials"]]),
        },
        "load_1min": {"budget": load_before_budget, "search": load_before_search},
        "sweep_s": round(sweep_s, 1),
        "search_s": round(search_s, 1),
        "search_exit": done.returncode,
    }


def _retime_seed(folder: Path, runtime: str, size: int, threads: int, repeats: int) -> dict:
    """One seed's sweep models and chosen model, all prepared, then timed in interleaved rounds
    (in a process of their own: `retime`). Returns ms by trial name, the chosen one as "chosen"."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from analysis.latency import deployable
    from deploy.artefacts import load_artefact
    from deploy.timing import TimingSetup, prepare, time_rounds
    from trainables.config import TrialConfig

    setup = TimingSetup(runtime, (size, size), threads, repeats)
    results = json.loads((folder / "search" / "results.json").read_text())
    runners = {}
    for b in results["baselines"]:
        trial = folder / "sweep" / "trials" / b["trial"]
        cfg = TrialConfig.from_dict(yaml.safe_load((trial / "config.yaml").read_text()))
        runners[b["trial"]] = prepare(
            deployable(trial, cfg), cfg, setup, folder / "retimed" / trial.name
        )
    if results["chosen"]:  # None when nothing the search tried met the budget
        source = load_artefact(Path(results["chosen"]["out_dir"]) / "checkpoints" / "final.pt")
        runners["chosen"] = prepare(source.model, source.cfg, setup, folder / "retimed" / "chosen")
    return {key: t["latency_ms"] for key, t in time_rounds(runners, setup).items()}


def retime(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every seed's sweep models and chosen model timed again, each seed in a fresh spawned
    process, one after the other (a process that has loaded many models times them 25-50 %
    slow on these machines); the comparison redone with those latencies."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    seeds = {}
    for folder in sorted(out.glob("seed*")):
        res = json.loads((folder / "search" / "results.json").read_text())
        with ctx.Pool(1) as pool:
            timed = pool.apply(
                _retime_seed, (folder, args.runtime, args.size, args.threads, args.repeats)
            )
        rows = [{**b, "retimed_ms": timed[b["trial"]]} for b in res["baselines"]]
        within = [r for r in rows if r["pruner"] != "none" and r["retimed_ms"] <= res["budget_ms"]]
        best = max(within, key=lambda r: r["val_miou"]) if within else None
        chosen = res["chosen"] or {}
        seeds[folder.name] = {
            "budget_ms": res["budget_ms"],
            "chosen_test_miou": chosen.get("test_miou"),
            "chosen_search_ms": chosen.get("latency_ms"),
            "chosen_retimed_ms": timed.get("chosen"),
            "best_uniform": best,
            "delta_test_miou": (
                chosen["test_miou"] - best["test_miou"] if chosen and best else None
            ),
            "baselines": rows,
        }
    return seeds


def table(rows: list[dict[str, Any]], runtime: str) -> str:
    lines = [
        f"| seed | budget ms ({runtime}) | search: test mIoU / ms / sparsity | best uniform under "
        "budget: test mIoU / ms / sparsity | Δ test mIoU | fine-tune epochs search / sweep | "
        "configurations within budget / all, search; sweep |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def side(r: dict[str, Any] | None) -> str:
        if r is None:
            return "none under budget"
        return f"{r['test_miou']:.3f} / {r['latency_ms']:.1f} / {r['sparsity']:.2f}"

    for row in rows:
        delta, n = row["delta_test_miou"], row["configurations"]
        lines.append(
            f"| {row['seed']} | {row['budget_ms']:.1f} | {side(row['chosen'])} | "
            f"{side(row['best_uniform'])} | {'n/a' if delta is None else f'{delta:+.3f}'} | "
            f"{row['finetune_epochs']['search']} / {row['finetune_epochs']['sweep']} | "
            f"{n['search_within_budget']} / {n['search']}; {n['sweep_within_budget']} / "
            f"{n['sweep']} |"
        )
    paired = [r for r in rows if r["delta_test_miou"] is not None]
    lines.append(
        summary(
            [r["delta_test_miou"] for r in paired],
            [r["chosen"]["latency_ms"] / r["best_uniform"]["latency_ms"] for r in paired],
        )
    )
    return "\n".join(lines)


def summary(deltas: list[float], speed: list[float]) -> str:
    """Mean and 95% t-interval of the paired differences: test mIoU, and the search's latency
    as a fraction of the uniform model's."""
    from analysis.stats import t_interval

    if len(deltas) < 2:
        return ""
    n, mean, sd, low, high = t_interval(deltas)
    _, ratio, _, r_low, r_high = t_interval(speed)
    return (
        f"\nover {n} seeds: Δ test mIoU mean {mean:+.3f} (sd {sd:.3f}, 95% interval "
        f"{low:+.3f} to {high:+.3f}); the search's latency / the uniform model's: mean "
        f"{ratio:.2f} (95% interval {r_low:.2f} to {r_high:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.retime:
        seeds = retime(args.out, args)
        (args.out / "retimed.json").write_text(json.dumps(seeds, indent=2))
        paired = [s for s in seeds.values() if s["delta_test_miou"] is not None]
        print(
            summary(
                [s["delta_test_miou"] for s in paired],
                [s["chosen_retimed_ms"] / s["best_uniform"]["retimed_ms"] for s in paired],
            )
        )
        for name, seed in seeds.items():
            best, delta = seed["best_uniform"], seed["delta_test_miou"]
            side = (
                f"{best['trial']} {best['test_miou']:.3f} at {best['retimed_ms']:.2f} ms"
                if best
                else "none"
            )
            search = (
                f"{seed['chosen_test_miou']:.3f} at {seed['chosen_retimed_ms']:.2f} ms"
                if seed["chosen_retimed_ms"] is not None
                else "none under budget"
            )
            print(
                f"{name}: budget {seed['budget_ms']:.2f} ms; search {search}; best uniform "
                f"{side}; delta {'n/a' if delta is None else f'{delta:+.3f}'}"
            )
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    from trainables.cost import cpu_name

    rows = []
    for seed in args.seeds.split(","):
        rows.append(one_seed(args, int(seed)))
        record = {  # after every seed: a run cut short keeps the seeds it finished
            "command": " ".join(sys.argv),
            "cpu": cpu_name(),
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "args": {k: str(v) for k, v in vars(args).items()},
            "seeds": rows,
        }
        (args.out / "results.json").write_text(json.dumps(record, indent=2))
    print(table(rows, args.runtime))
    return 0


if __name__ == "__main__":
    sys.exit(main())

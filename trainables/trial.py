"""One trial: train -> prune -> fine-tune, with per-epoch records, exact resume and final metrics."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables import engine
from trainables.checkpoint import (
    append_jsonl,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
    write_json,
    write_text,
    write_yaml,
)
from trainables.config import TrialConfig
from trainables.cost import fp32_bytes, inference_summary
from trainables.data import build_datasets
from trainables.data.dataset import epoch_seed
from trainables.errors import UserError
from trainables.models import build_model
from trainables.provenance import code_version
from trainables.pruning.masks import sparsity_stats
from trainables.pruning.pruner import Pruner
from trainables.pruning.surgery import Cut, channel_structure, load_slim, slim

Reporter = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrialCallbacks:
    """What a caller may do around a trial's loop (the budget search, sweep/budget.py).

    `epoch`: a context manager each training epoch (train and validation) runs inside;
    `after_cut`: called with the slim model once a structured-pruned trial has cut it, before
    fine-tuning (its cost is known from here on; it may raise to stop the trial)."""

    epoch: Callable[[], contextlib.AbstractContextManager] | None = None
    after_cut: Callable[[torch.nn.Module], None] | None = None


EXAMPLES = 4  # test images whose predictions are kept for the report


def stage_plan(
    cfg: TrialConfig, warm_start: bool, finetune_only: bool = False
) -> list[tuple[str, int]]:
    """(stage, epochs) in order; a warm start skips the dense training stage, and a warm start
    from a pruned checkpoint (its masks fixed) runs only the fine-tuning stage."""
    if finetune_only:
        return [("finetune", cfg.stages.finetune_epochs)]
    plan = [] if warm_start else [("train", cfg.stages.train_epochs)]
    if cfg.pruned:
        plan += [("prune", cfg.stages.prune_epochs), ("finetune", cfg.stages.finetune_epochs)]
    return plan


@dataclass
class Position:
    """Where a trial stands: the last completed epoch of a stage (epoch 0: stage not begun)."""

    stage_index: int = 0
    epoch: int = 0
    global_epoch: int = 0
    dense_test: dict[str, Any] | None = None


class Trial:
    """The state of one running trial: model, data, pruner and the files in its folder.

    A structured-pruned trial with `pruning.finetunes_slim` cuts its model slim when fine-tuning
    starts (`cut`): from there on `model` is the slim one, `pruner` is None (nothing is left to
    mask) and `cut` holds its structure and the full-size model's counts."""

    def __init__(
        self,
        cfg: TrialConfig,
        out: Path,
        warm_start: Path | None,
        reporter: Reporter | None,
        *,
        finetune_only: bool = False,
        evaluate_test: bool = True,
        callbacks: TrialCallbacks | None = None,
    ):
        self.cfg = cfg
        self.callbacks = callbacks or TrialCallbacks()
        self.out = out
        self.ckpt_dir = out / "checkpoints"
        self.reporter = reporter
        self.warm_start = warm_start
        if finetune_only and (warm_start is None or not cfg.pruned):
            raise UserError("fine-tuning only needs a pruned checkpoint to start from and a pruner")
        self.finetune_only = finetune_only
        self.evaluate_test = evaluate_test
        self.plan = stage_plan(cfg, warm_start is not None, finetune_only)
        self.device = engine.resolve_device(cfg.runtime.device)
        self.runtime = cfg.runtime.resolve(self.device.type)
        engine.seed_everything(cfg.seed)
        self.data = build_datasets(cfg.data, cfg.seed, self.runtime.augment)
        self.num_classes = cfg.data.classes
        # A warm start or a resume loads every weight from a checkpoint: fetching ImageNet
        # weights first would only fail on a node without them, for nothing.
        loads_checkpoint = warm_start is not None or (self.ckpt_dir / "last.pt").exists()
        model_cfg = (
            dataclasses.replace(cfg.model, encoder_weights=None) if loads_checkpoint else cfg.model
        )
        self._use_model(build_model(model_cfg, self.num_classes))
        self.cut: Cut | None = None
        self.loss_fn = engine.build_loss(cfg.loss).to(self.device)
        self.val_loader = self._loader(self.data.val, train=False)
        self.test_loader = self._loader(self.data.test, train=False)
        self.train_loader = self._loader(self.data.train, train=True, seed=cfg.seed)
        self.iters_per_epoch = len(self.train_loader)
        if self.iters_per_epoch == 0:
            raise UserError(f"the training split has no batches (size {len(self.data.train)})")
        self.pruner: Pruner | None = None
        if cfg.pruned:
            self.pruner = Pruner(
                cfg.pruning,
                self.model,
                prune_epochs=cfg.stages.prune_epochs,
                iters_per_epoch=self.iters_per_epoch,
            )

    def _use_model(self, model: torch.nn.Module) -> None:
        """Train and evaluate `model` from now on, on the trial's device and memory format."""
        self.model = model.to(self.device)
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Training crops have one size, so a compiled (and CUDA-graphed) forward pays off there;
        # evaluation sees whole images of many sizes and stays eager. Parameters are shared.
        self.train_model = (
            torch.compile(self.model, mode=self.runtime.compile)
            if self.runtime.compile != "off"
            else self.model
        )

    def _loader(self, dataset: Any, *, train: bool, seed: int = 0) -> torch.utils.data.DataLoader:
        bs = self.cfg.optim.batch_size
        return engine.make_loader(
            dataset, bs, train=train, num_workers=self.cfg.data.num_workers, seed=seed
        )

    # ---- state ------------------------------------------------------------------------------

    def restore(self) -> tuple[Position, dict[str, Any] | None]:
        """Resume from checkpoints/last.pt, else warm-start from a dense checkpoint, else fresh."""
        last = self.ckpt_dir / "last.pt"
        if last.exists():
            state = load_checkpoint(last)
            if state.get("slim") is not None:  # written while fine-tuning slim
                self._adopt_slim(state, last)
            else:
                self.model.load_state_dict(state["model"])
                if self.pruner is not None and state.get("pruner") is not None:
                    self.pruner.load_state_dict(state["pruner"])
            pos = Position(
                state["stage_index"], state["epoch"], state["global_epoch"], state["dense_test"]
            )
            self._truncate_records(pos.global_epoch)
            return pos, state
        self._truncate_records(0)
        if self.warm_start is not None:
            state = load_checkpoint(self.warm_start)
            if "model" not in state:
                raise UserError(f"{self.warm_start} is not a corroprune checkpoint (no model)")
            self._warm_start_from(state)
            dense = state.get("dense_test")
            if dense is None and self.evaluate_test:
                dense = self.test_metrics()
            return Position(dense_test=dense), None
        return Position(), None

    def _warm_start_from(self, state: dict[str, Any]) -> None:
        """Take the model (and for fine-tuning only, the fixed masks or the slim model) from a
        warm-start checkpoint."""
        if state.get("slim") is not None:
            if not self.finetune_only:
                raise UserError(
                    f"{self.warm_start} holds a model cut slim for fine-tuning: only a "
                    "fine-tuning-only start can use it; start pruning from a dense.pt"
                )
            if not self.cfg.pruning.finetunes_slim:
                raise UserError(
                    f"{self.warm_start} holds a model cut slim: it can only be fine-tuned slim "
                    "(pruning.slim_finetune true or auto); masked fine-tuning needs the "
                    "full-size final.pt of a trial run with pruning.slim_finetune=false"
                )
            self._adopt_slim(state, self.warm_start)
            return
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise UserError(
                f"dense checkpoint {self.warm_start} does not fit model "
                f"{self.cfg.model.arch}/{self.cfg.model.encoder}: {str(err).splitlines()[0]}"
            ) from None
        if self.finetune_only:
            if "masks" not in state:
                raise UserError(f"{self.warm_start} holds no pruning masks: use a pruned final.pt")
            self.pruner.masks.load_state_dict(state["masks"])
            self.pruner.freeze()

    def _adopt_slim(self, state: dict[str, Any], path: Path) -> None:
        """Continue with the slim model a checkpoint holds (its "slim" record and weights)."""
        try:
            model, self.cut = load_slim(self.cfg, state["slim"], state["model"])
        except ValueError as err:
            raise UserError(
                f"{path}: its slim model does not fit {self.cfg.model.arch}/"
                f"{self.cfg.model.encoder} with pruning.granularity "
                f"{self.cfg.pruning.granularity!r}: {err}"
            ) from None
        self.pruner = None
        self._use_model(model)

    def cut_slim(self) -> None:
        """Replace the masked full-size model by the slim one: the masked channels cut out, the
        same outputs from smaller layers. Only when masks are fixed (fine-tuning), and before its
        optimizer is built: each stage starts a fresh one, so no optimizer state is lost."""
        pruner = self.pruner
        pruner.masks.apply()
        stats = sparsity_stats(self.model, pruner.masks, pruner.achieved_sparsity())
        full_bytes = fp32_bytes(self.model)
        model = slim(self.model, self.cfg, pruner.masks.state_dict())
        self.cut = Cut(
            structure=channel_structure(model, self.cfg),
            achieved_sparsity=stats["achieved_sparsity"],
            prunable_params=stats["prunable_params"],
            total_params=stats["total_params"],
            fp32_bytes=full_bytes,
        )
        self.pruner = None  # its masks and parameters are the full-size model's
        self._use_model(model)

    def _truncate_records(self, global_epoch: int) -> None:
        """Drop records written after the checkpoint we resume from (a crash between the two)."""
        path = self.out / "metrics.jsonl"
        records = read_jsonl(path)
        kept = [r for r in records if r["global_epoch"] <= global_epoch]
        if len(kept) != len(records):
            write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def save(self, pos: Position, optimizer: Any, scheduler: Any) -> None:
        """Write checkpoints/last.pt: everything a resume after `pos` needs."""
        state = {
            "stage_index": pos.stage_index,
            "epoch": pos.epoch,
            "global_epoch": pos.global_epoch,
            "dense_test": pos.dense_test,
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "slim": self.cut.to_dict() if self.cut is not None else None,
            "config": self.cfg.to_dict(),
        }
        save_checkpoint(state, self.ckpt_dir / "last.pt")

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        pos, state = self.restore()
        for index in range(pos.stage_index, len(self.plan)):
            stage, epochs = self.plan[index]
            resume_state = state if index == pos.stage_index and pos.epoch > 0 else None
            if index > pos.stage_index:
                pos.stage_index, pos.epoch = index, 0
            self.run_stage(stage, epochs, pos, resume_state)
            if stage == "train" and self.evaluate_test:
                pos.dense_test = self.test_metrics()
                save_checkpoint(
                    {
                        "model": self.model.state_dict(),
                        "dense_test": pos.dense_test,
                        "config": self.cfg.to_dict(),
                    },
                    self.ckpt_dir / "dense.pt",
                )
        if pos.dense_test is None and self.evaluate_test:  # no training stage ran at all
            pos.dense_test = self.test_metrics()
        return self.finish(pos, time.perf_counter() - started)

    def run_stage(self, stage: str, epochs: int, pos: Position, state: dict | None) -> None:
        if stage == "finetune" and self.pruner is not None:
            self.pruner.freeze()
            # Cut as the stage starts; a resume inside it continues as its last.pt was written
            # (slim, or full-size by a corroprune from before slim fine-tuning).
            if state is None and self.cfg.pruning.finetunes_slim:
                self.cut_slim()
                if self.callbacks.after_cut is not None:
                    self.callbacks.after_cut(self.model)
        if self.pruner is not None and stage != "train":
            self.pruner.masks.apply()
        optimizer, scheduler = engine.build_optimizer(self.model, self.cfg.optim)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        hooks = self._hooks(stage)
        written_at = time.monotonic()  # a stage starts from a written (or no) checkpoint
        for epoch in range(pos.epoch + 1, epochs + 1):
            with self.callbacks.epoch() if self.callbacks.epoch else contextlib.nullcontext():
                record = self._epoch(stage, epoch, epochs, pos, optimizer, scheduler, hooks)
            # The record first: a crash before the save drops it on resume (its epoch re-runs);
            # the other order could lose it for good.
            append_jsonl(self.out / "metrics.jsonl", record)
            if self.cfg.runtime.checkpoint_due(epoch, epochs, time.monotonic() - written_at):
                self.save(pos, optimizer, scheduler)
                written_at = time.monotonic()
            if self.reporter is not None:
                self.reporter(record)

    def _epoch(
        self,
        stage: str,
        epoch: int,
        epochs: int,
        pos: Position,
        optimizer: Any,
        scheduler: Any,
        hooks: engine.StepHooks,
    ) -> dict[str, Any]:
        """One epoch of `stage`: train, update masks if due, validate; `pos` advanced."""
        t0 = time.perf_counter()
        seed = epoch_seed(self.cfg.seed, pos.global_epoch + 1)
        torch.manual_seed(seed)
        self.train_loader.sampler.set_epoch(pos.global_epoch + 1)
        desc = f"{stage} {epoch}/{epochs}"
        train_loss = engine.train_one_epoch(
            self.train_model,
            self.train_loader,
            self.loss_fn,
            optimizer,
            scheduler,
            self.device,
            hooks=hooks,
            runtime=self.runtime,
            desc=desc,
        )
        changed = False
        if stage == "prune" and self.pruner is not None:
            changed = self.pruner.end_of_epoch(epoch)
        val = engine.evaluate(
            self.model,
            self.val_loader,
            self.loss_fn,
            self.num_classes,
            self.device,
            self.runtime,
            desc=f"val {epoch}/{epochs}",
        )
        pos.epoch, pos.global_epoch = epoch, pos.global_epoch + 1
        record = self._record(stage, epoch, pos, scheduler, train_loss, val, changed)
        record["time_s"] = round(time.perf_counter() - t0, 4)
        return record

    def _hooks(self, stage: str) -> engine.StepHooks:
        if self.pruner is None or stage == "train":
            return engine.StepHooks()
        return engine.StepHooks(
            after_backward=self.pruner.after_backward if stage == "prune" else None,
            before_step=self.pruner.masks.mask_gradients,
            after_step=self.pruner.after_step,
        )

    def _record(
        self,
        stage: str,
        epoch: int,
        pos: Position,
        scheduler: Any,
        train_loss: float,
        val: dict[str, Any],
        changed: bool,
    ) -> dict[str, Any]:
        target = 0.0
        if self.pruner is not None and stage == "prune":
            target = self.pruner.target_sparsity(epoch)
        elif self.cfg.pruned and stage == "finetune":
            target = self.cfg.pruning.sparsity
        return {
            "stage": stage,
            "epoch": epoch,
            "global_epoch": pos.global_epoch,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_miou": val["miou"],
            "val_miou_corrosion": val["miou_corrosion"],
            "val_iou": val["iou"],
            "target_sparsity": target,
            **self._sparsity(),
            "mask_updated": changed,
        }

    def _sparsity(self) -> dict[str, Any]:
        if self.cut is not None:
            return self.cut.sparsity_stats(self.model)
        if self.pruner is None:
            return sparsity_stats(self.model, None)
        return sparsity_stats(self.model, self.pruner.masks, self.pruner.achieved_sparsity())

    def test_metrics(self) -> dict[str, Any]:
        test = engine.evaluate(
            self.model,
            self.test_loader,
            self.loss_fn,
            self.num_classes,
            self.device,
            self.runtime,
            desc="test",
        )
        return {
            "test_loss": test["loss"],
            "test_miou": test["miou"],
            "test_miou_corrosion": test["miou_corrosion"],
            "test_iou": test["iou"],
            "test_all_background_miou": test["all_background_miou"],
            "test_miou_classes": test["miou_classes"],
        }

    def finish(self, pos: Position, wall_time: float) -> dict[str, Any]:
        pruned = self.test_metrics() if self.cfg.pruned and self.evaluate_test else None
        final_state = {
            "model": self.model.state_dict(),
            "config": self.cfg.to_dict(),
            "dense_test": pos.dense_test,
        }
        if self.pruner is not None:
            final_state["masks"] = self.pruner.masks.state_dict()
        if self.cut is not None:
            final_state["slim"] = self.cut.to_dict()
        save_checkpoint(final_state, self.ckpt_dir / "final.pt")
        examples = {}
        if self.evaluate_test:
            examples = engine.predict_examples(self.model, self.data.test, EXAMPLES, self.device)
        if examples:
            np.savez_compressed(self.out / "examples.npz", **examples)
        result = {
            "class_names": list(self.data.class_names),
            "dense": pos.dense_test,
            "pruned": pruned,
            **self._sparsity(),
            "inference": self.inference(final_state.get("masks")),
            "wall_time_s": round(wall_time, 3),
            "warm_start": str(self.warm_start) if self.warm_start else None,
        }
        write_json(self.out / "final.json", result)
        # Finished: final.pt and final.json stand for the trial now; nothing left to resume.
        (self.ckpt_dir / "last.pt").unlink(missing_ok=True)
        if self.reporter is not None and self.evaluate_test:
            summary = pruned or pos.dense_test
            self.reporter(
                {
                    "final": True,
                    "test_miou": summary["test_miou"],
                    "test_miou_corrosion": summary["test_miou_corrosion"],
                    "dense_test_miou": pos.dense_test["test_miou"],
                    "achieved_sparsity": result["achieved_sparsity"],
                }
            )
        return result

    def inference(self, masks: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """The deployable model's cost (slim when channel-pruned) at the test images' size."""
        size = tuple(self.data.test[0][0].shape[-2:]) if len(self.data.test) else (512, 512)
        # Cut already (no masks left) or cut here from the masked full-size model.
        deployable = slim(copy.deepcopy(self.model).cpu(), self.cfg, masks)
        full_bytes = self.cut.fp32_bytes if self.cut is not None else fp32_bytes(self.model)
        repeats = self.cfg.runtime.latency_repeats
        return inference_summary(deployable, size, repeats, full_bytes)


def environment(cfg: TrialConfig, meta: dict[str, Any] | None) -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for pkg in (
        "corroprune",
        "torch",
        "segmentation-models-pytorch",
        "timm",
        "albumentations",
        "numpy",
        "ray",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    device = engine.resolve_device(cfg.runtime.device)
    return {
        "seed": cfg.seed,
        "versions": versions,
        "code_version": code_version(),
        "hostname": socket.gethostname(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "runtime": dataclasses.asdict(cfg.runtime.resolve(device.type)),  # "auto" decided
        "torch_threads": torch.get_num_threads(),
        "started_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        **(meta or {}),
    }


def _check_same_config(out: Path, cfg: TrialConfig) -> None:
    import yaml

    path = out / "config.yaml"
    if not path.exists():
        return
    existing = yaml.safe_load(path.read_text())
    # Written by an older version: keys added since then take their defaults (a key that no
    # longer exists stays, and makes it a different configuration).
    with contextlib.suppress(UserError):
        existing = TrialConfig.from_dict(existing).to_dict()
    if existing != cfg.to_dict():
        raise UserError(
            f"{out} already holds a run with a different configuration ({path}); "
            "resume it with the same settings or choose a new --out"
        )


def run_trial(
    cfg: TrialConfig,
    out_dir: Path,
    *,
    warm_start: Path | None = None,
    reporter: Reporter | None = None,
    meta: dict[str, Any] | None = None,
    finetune_only: bool = False,
    evaluate_test: bool = True,
    callbacks: TrialCallbacks | None = None,
) -> dict[str, Any]:
    """Run (or resume, or return the stored result of) one trial in `out_dir`.

    `finetune_only`: start from a pruned checkpoint (`warm_start`, with masks) and run only the
    fine-tuning stage. `evaluate_test=False` keeps the test split untouched (searches choose on
    validation only). `callbacks`: see `TrialCallbacks`.
    """
    out = Path(out_dir).resolve()
    final = out / "final.json"
    if final.exists():
        (out / "checkpoints" / "last.pt").unlink(missing_ok=True)  # a crash before its removal
        return json.loads(final.read_text())
    out.mkdir(parents=True, exist_ok=True)
    _check_same_config(out, cfg)
    write_yaml(out / "config.yaml", cfg.to_dict())
    write_json(out / "env.json", environment(cfg, meta))
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    warm = Path(warm_start).resolve() if warm_start else None
    trial = Trial(
        cfg,
        out,
        warm,
        reporter,
        finetune_only=finetune_only,
        evaluate_test=evaluate_test,
        callbacks=callbacks,
    )
    return trial.run()

"""Models for the deployment tests: pruned untrained ones built in memory, and one tiny trained
trial with every export of it (checkpoint, compact, ONNX fp32 and INT8)."""

from __future__ import annotations

import functools
from pathlib import Path

import onnx
import pytest
import torch

from deploy.artefacts import load_artefact
from deploy.export import Int8Settings, export_compact, export_onnx, export_onnx_int8
from tests.conftest import tiny_config
from trainables.config import TrialConfig
from trainables.models import build_model
from trainables.pruning.pruner import Pruner
from trainables.trial import run_trial

# test_trial.py's quick trial: 32 px, eight training images (six after validation's share).
QUICK = {
    "data": {"crop_size": 32, "synthetic": {"train": 8, "test": 2, "size": 32}},
    "runtime": {"latency_repeats": 0},
}


def pruned_with_masks(arch: str, encoder: str, sparsity: float, granularity: str):
    cfg = TrialConfig.from_dict(
        {
            "data": {"dataset": "synthetic"},
            "model": {"arch": arch, "encoder": encoder, "encoder_weights": None},
            "pruning": {
                "pruner": "magnitude",
                "sparsity": sparsity,
                "steps": 1,
                "granularity": granularity,
            },
            "stages": {"prune_epochs": 1},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, 4).eval()
    pruner = Pruner(cfg.pruning, model, prune_epochs=1, iters_per_epoch=1)
    pruner.end_of_epoch(1)
    return model, cfg, pruner.masks.state_dict()


def pruned_model(
    arch: str, encoder: str = "tu-test_resnet", sparsity: float = 0.9, granularity: str = "element"
):
    model, cfg, _ = pruned_with_masks(arch, encoder, sparsity, granularity)
    return model, cfg


@pytest.fixture(scope="session")
def shipped(tmp_path_factory: pytest.TempPathFactory):
    """`shipped()`: {"pt", "compact", "onnx", "int8": path} of one tiny dense trial (FPN on the
    synthetic set, 32 px, two epochs), and its final.json. Run on first call, inside a test, so
    with the threads the conftest pins."""
    out = tmp_path_factory.mktemp("shipped")
    cfg = TrialConfig.from_dict(tiny_config(**QUICK))

    @functools.cache
    def run() -> tuple[dict[str, Path], dict]:
        result = run_trial(cfg, out / "trial")
        paths = {"pt": out / "trial" / "checkpoints" / "final.pt"}
        source = load_artefact(paths["pt"])
        paths["compact"] = export_compact(source.model, source.cfg, out / "m.safetensors")
        paths["onnx"] = out / "m.onnx"
        export_onnx(source.model, source.cfg, paths["onnx"], height=32, width=32)
        paths["int8"] = out / "m.int8.onnx"
        export_onnx_int8(source, paths["int8"], Int8Settings(size=(32, 32)))
        return paths, result

    return run


def foreign_onnx(paths: dict[str, Path], tmp_path: Path) -> Path:
    """The fp32 export with its corroprune metadata stripped: an ONNX file from elsewhere."""
    model = onnx.load(str(paths["onnx"]))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    return tmp_path / "foreign.onnx"

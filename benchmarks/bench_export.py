"""Size on disk: dense checkpoint vs compact sparse export, per sparsity (magnitude masks).

    python benchmarks/bench_export.py [--arch fpn] [--encoder resnet101]

Sizes do not depend on training, only on the number of zeros, so masks come from |w|.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from deploy.export import export_compact  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.pruning.pruner import Pruner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="fpn")
    parser.add_argument("--encoder", default="resnet101")
    parser.add_argument("--sparsities", default="0,0.2,0.5,0.9")
    args = parser.parse_args()
    print(f"# {args.arch} / {args.encoder}, 4 classes; MiB on disk")
    print("| sparsity | dense .pt (fp32) | compact fp32 | compact fp16 | fp16 / dense |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for s in (float(v) for v in args.sparsities.split(",")):
            cfg = TrialConfig.from_dict(
                {
                    "data": {"dataset": "synthetic"},
                    "model": {"arch": args.arch, "encoder": args.encoder, "encoder_weights": None},
                    "pruning": {"pruner": "magnitude" if s else "none", "sparsity": s, "steps": 1},
                    "stages": {"prune_epochs": 1},
                }
            )
            torch.manual_seed(0)
            model = build_model(cfg.model, 4)
            if s:
                Pruner(cfg.pruning, model, prune_epochs=1, iters_per_epoch=1).end_of_epoch(1)
            torch.save(model.state_dict(), d / "dense.pt")
            export_compact(model, cfg, d / "c32.safetensors")
            export_compact(model, cfg, d / "c16.safetensors", fp16=True)
            sizes = [
                (d / n).stat().st_size / 2**20
                for n in ("dense.pt", "c32.safetensors", "c16.safetensors")
            ]
            print(
                f"| {s:g} | {sizes[0]:.1f} | {sizes[1]:.1f} | {sizes[2]:.1f} | {100 * sizes[2] / sizes[0]:.1f} % |"
            )


if __name__ == "__main__":
    main()

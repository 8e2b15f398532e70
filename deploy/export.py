"""Exports that ship: compact sparse files (non-zeros plus a bit mask), ONNX fp32 and static INT8.

Every export is written to a temporary file and renamed into place only once it is complete and
checked, so an interrupted or refused export leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploy.artefacts import (
    META_CLASSES,
    META_CONFIG,
    META_FORMAT,
    META_PRECISION,
    ONNX_FORMAT,
    Artefact,
    names_of,
    onnx_module,
    onnxruntime,
)
from deploy.predict import preprocess
from trainables.checkpoint import _atomic
from trainables.compact import FORMAT, compact_state
from trainables.config import TrialConfig
from trainables.data import build_datasets
from trainables.data.dataset import SegmentationDataset
from trainables.errors import UserError
from trainables.pruning.surgery import channel_structure

OPSET = 17
# Below this share of pixels with the fp32 model's class, an INT8 model is broken (calibrated on
# the wrong data, a graph ONNX Runtime quantised wrongly), not merely a little less accurate:
# published INT8 segmentation models lose 0-0.6 mIoU points.
MIN_INT8_AGREEMENT = 0.8
CHECK_IMAGES = 8  # validation images the INT8 model is compared with fp32 on


def export_compact(model: nn.Module, cfg: TrialConfig, path: Path, *, fp16: bool = False) -> Path:
    """A safetensors file: loading it runs no code, and it holds the config to rebuild the model."""
    from safetensors.torch import save_file

    state = model.state_dict()
    meta = {
        "format": FORMAT,
        "config": json.dumps(cfg.to_dict()),
        "shapes": json.dumps({k: list(v.shape) for k, v in state.items()}),
        "dtypes": json.dumps({k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}),
        "channels": json.dumps(channel_structure(model, cfg)),
    }
    flat = compact_state(state, fp16=fp16)
    _atomic(Path(path), lambda tmp: save_file(flat, str(tmp), metadata=meta))
    return Path(path)


def _annotate(path: Path, cfg: TrialConfig, names: tuple[str, ...], precision: str) -> None:
    """Embed what the file predicts (the trial config, class names, precision) in its metadata."""
    onnx = onnx_module()
    model = onnx.load(str(path))
    meta = {
        META_FORMAT: ONNX_FORMAT,
        META_CONFIG: json.dumps(cfg.to_dict()),
        META_CLASSES: json.dumps(list(names)),
        META_PRECISION: precision,
    }
    kept = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _trace_onnx(model: nn.Module, path: Path, height: int, width: int) -> None:
    onnx_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # smp's shape checks
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, 3, height, width),),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={
                "image": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "height", 3: "width"},
            },
            opset_version=OPSET,
            dynamo=False,
        )


def export_onnx(
    model: nn.Module, cfg: TrialConfig, path: Path, *, height: int, width: int
) -> float:
    """ONNX with dynamic batch and image size (multiples of 32), the trial config in its metadata.
    Written only once onnxruntime matches torch on it; returns the largest logit difference."""
    errors: list[float] = []

    def write(tmp: Path) -> None:
        _trace_onnx(model, tmp, height, width)
        _annotate(tmp, cfg, names_of(cfg), "fp32")
        errors.append(verify_onnx(model, tmp, height=height, width=width))

    _atomic(Path(path), write)
    return errors[0]


def logits_match(got: np.ndarray, expected: np.ndarray, tolerance: float = 1e-3) -> bool:
    """onnxruntime's logits equal torch's up to float rounding: within `tolerance` of the logits'
    own scale (their largest magnitude, at least 1). Rounding grows with the activations, so a
    fixed absolute bound refuses sound exports of models with large logits."""
    scale = max(1.0, float(np.abs(expected).max()))
    return bool(np.abs(got - expected).max() <= tolerance * scale)


def verify_onnx(model: nn.Module, path: Path, *, height: int, width: int, seed: int = 0) -> float:
    """Max absolute difference between onnxruntime's and torch's logits on a random image."""
    ort = onnxruntime()
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    error = float(np.abs(got - expected).max())
    if not logits_match(got, expected):
        raise UserError(
            f"{path}: onnxruntime output differs from torch (max abs diff {error:.3g}, logits up "
            f"to {float(np.abs(expected).max()):.3g})"
        )
    return error


# ---- static INT8 -------------------------------------------------------------------------------


def dataset_images(dataset: SegmentationDataset, count: int) -> list[np.ndarray]:
    """Up to `count` images of `dataset`, spread evenly over it, decoded as the trial read them
    and preprocessed as `predict` does: (1, 3, H, W) float32 each."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round())
    return [preprocess(np.asarray(dataset.raw(int(i))[0])) for i in picks]


class ImageReader:
    """ONNX Runtime's CalibrationDataReader over preprocessed images (one batch of 1 each)."""

    def __init__(self, images: list[np.ndarray], input_name: str) -> None:
        self.batches: Iterator[np.ndarray] = iter(images)
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self.batches, None)
        return None if image is None else {self.input_name: image}


@dataclass(frozen=True)
class Int8Check:
    """The INT8 model against its fp32 source on validation images (which calibration did not
    see), or on calibration images where the trial's split has no validation part."""

    images: int
    held_out: bool  # validation images
    agreement: float  # share of pixels where both predict the same class
    max_logit_diff: float


def _not_rank_one_axis(record: logging.LogRecord) -> bool:
    return "is out-of-range for weight" not in record.getMessage()


@contextlib.contextmanager
def _quiet_rank_one_axes() -> Iterator[None]:
    """Without ONNX Runtime's warning for every GroupNorm scale (a rank-1 constant, which it
    quantises per tensor instead of per channel, as it should): one line per norm otherwise."""
    root = logging.getLogger()
    root.addFilter(_not_rank_one_axis)
    try:
        yield
    finally:
        root.removeFilter(_not_rank_one_axis)


def quantize_int8(fp32: Path, out: Path, calibration: list[np.ndarray]) -> None:
    """ONNX Runtime static quantization as its documentation recommends for CNNs on CPU:
    `quant_pre_process` (ONNX shape inference, graph optimisation such as Conv+BatchNorm folding),
    then `quantize_static` in QDQ format, activations and weights signed INT8 (S8S8), weights
    per output channel, activation ranges (MinMax) from the `calibration` images."""
    onnxruntime()
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="corroprune-quant-") as tmp, _quiet_rank_one_axes():
        pre = Path(tmp) / "pre.onnx"
        # Symbolic shape inference is meant for transformer graphs (ONNX Runtime's docs) and
        # gives up on this graph's dynamic height and width; ONNX's own shape inference and the
        # graph optimisation still run.
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        input_name = onnx_module().load(str(pre)).graph.input[0].name
        quantize_static(
            str(pre),
            str(out),
            ImageReader(calibration, input_name),  # a CalibrationDataReader by its get_next
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )


def compare_int8(fp32: Path, int8: Path, images: list[np.ndarray], held_out: bool) -> Int8Check:
    """Both models on ONNX Runtime over `images`: how often their classes agree, per pixel."""
    ort = onnxruntime()
    sessions = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)
    ]
    same = total = 0
    diff = 0.0
    for image in images:
        a, b = (s.run(None, {s.get_inputs()[0].name: image})[0] for s in sessions)  # (1, C, H, W)
        same += int((a.argmax(1) == b.argmax(1)).sum())
        total += a.shape[0] * a.shape[2] * a.shape[3]
        diff = max(diff, float(np.abs(a - b).max()))
    return Int8Check(len(images), held_out, same / max(total, 1), diff)


@dataclass(frozen=True)
class Int8Settings:
    """What `export --format onnx-int8` takes besides the model."""

    calibration_images: int = 64
    data_root: Path | None = None  # where the dataset is on this machine (else the stored root)
    size: tuple[int, int] = (512, 512)  # example input of the fp32 export (any multiple of 32 runs)


def export_onnx_int8(source: Artefact, path: Path, settings: Int8Settings) -> tuple[Int8Check, int]:
    """A static INT8 ONNX model of `source` (a checkpoint, compact file or fp32 ONNX export),
    calibrated on training images of its own dataset and checked against fp32 on validation
    images. Returns the check and the number of calibration images used."""
    if source.kind == "onnx-int8":
        raise UserError(f"{source.path} is already an INT8 model; export from its fp32 source")
    if source.cfg is None:
        raise UserError(
            f"{source.path} carries no corroprune config: INT8 calibration needs the model's "
            "dataset; export it from its .pt checkpoint or with `corroprune export --format onnx`"
        )
    data = source.cfg.data
    if settings.data_root is not None:
        data = dataclasses.replace(data, root=str(settings.data_root))
    try:
        sets = build_datasets(data, seed=0)  # the trial's own train/val split
    except UserError as err:
        raise UserError(
            f"calibration data for {source.path}: {err} (--data-root DIR says where dataset "
            f"'{data.dataset}' is on this machine)"
        ) from None
    calibration = dataset_images(sets.train, settings.calibration_images)
    check_images = dataset_images(sets.val, CHECK_IMAGES) or calibration[:CHECK_IMAGES]
    with tempfile.TemporaryDirectory(prefix="corroprune-int8-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        if source.kind == "onnx":
            fp32 = source.path
        else:
            export_onnx(
                source.model, source.cfg, fp32, height=settings.size[0], width=settings.size[1]
            )
        quantize_int8(fp32, int8, calibration)
        _annotate(int8, source.cfg, source.class_names, "int8")
        check = compare_int8(fp32, int8, check_images, held_out=len(sets.val) > 0)
        if check.agreement < MIN_INT8_AGREEMENT:
            raise UserError(
                f"INT8 model of {source.path} agrees with fp32 on only {check.agreement:.1%} of "
                f"pixels ({check.images} images; at least {MIN_INT8_AGREEMENT:.0%} expected): "
                f"not written to {path}"
            )
        _atomic(Path(path), lambda t: t.write_bytes(int8.read_bytes()))
    return check, len(calibration)

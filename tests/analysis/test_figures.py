"""Each figure carries the expected traces, axis titles and titles."""

from __future__ import annotations

import base64
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.collect import examples, label_distribution, load_run
from analysis.figures import (
    ema,
    examples_figure,
    int8_figure,
    int8_rows,
    label_distribution_figure,
    latency_pareto_figure,
    pareto_front,
    per_class_figure,
    pruning_figure,
    size_pareto_figure,
    sparsity_figure,
    training_figure,
)
from analysis.images import colorize, png_data_uri
from tests.analysis.fake_run import (
    DENSE_MIOU,
    NO_LATENCY,
    PRUNE_EPOCHS,
    RUNNING,
    seeded,
    write_fake_run,
    write_int8_records,
)


@pytest.fixture(scope="module")
def run(fake_run_dir: Path):
    return load_run(fake_run_dir)


def test_ema_follows_its_equation() -> None:
    x = pd.Series([1.0, 0.0, 0.0, 1.0])
    expected = [1.0, 0.9, 0.81, 0.1 * 1 + 0.9 * 0.81]
    assert ema(x, 0.1).to_numpy() == pytest.approx(expected)


def test_label_distribution_figure(run) -> None:
    dist, source = label_distribution(run)
    fig = label_distribution_figure(dist, "synthetic", source)
    assert [t.type for t in fig.data] == ["bar"]
    assert list(fig.data[0].x) == ["good", "fair", "poor", "severe"]
    assert "Figure 4" in fig.layout.title.text and "test examples" in fig.layout.title.text
    assert fig.layout.yaxis.title.text == "share of labelled pixels (%)"


def test_training_figure_raw_and_ema_per_model(run) -> None:
    fig = training_figure(run.curves, "nea")
    assert [t.name for t in fig.data] == [
        f"{m} {kind}" for m in ("unet", "fpn", "linknet") for kind in ("raw", "EMA")
    ]
    raw, smooth = fig.data[2], fig.data[3]  # fpn
    assert np.asarray(smooth.y) == pytest.approx(ema(pd.Series(raw.y), 0.1).to_numpy())
    assert "Figure 5" in fig.layout.title.text and "alpha = 0.1" in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "training epoch"
    assert fig.layout.yaxis.title.text == "validation mIoU"


def test_pruning_figure_marks_boundary_and_steps(run) -> None:
    fig = pruning_figure(run.curves, "nea")
    names = [t.name for t in fig.data]
    assert "fpn lp s0.9" in names and "linknet agp s0.9" in names  # running trial: so far
    assert len(names) == 3 * 3 * 3 - 1  # one trial of nea not started
    lp = fig.data[names.index("fpn lp s0.9")]
    assert list(lp.marker.symbol).count("diamond") == 2  # two pruning steps
    assert lp.meta == {
        "dataset": "nea",
        "model": "fpn",
        "pruner": "lp",
        "granularity": "element",
        "sparsity": 0.9,
    }
    (boundary,) = fig.layout.shapes
    assert boundary.x0 == PRUNE_EPOCHS + 0.5
    assert "Figure 6" in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "epoch since pruning started"


def test_sparsity_figure_starts_each_line_at_the_dense_model(run) -> None:
    fig = sparsity_figure(run.results, "synthetic")
    by_name = {t.name: t for t in fig.data}
    # per model: dense star + one line per pruner; fpn and linknet also AGP at channel granularity
    assert len(fig.data) == 3 * (1 + 3) + 2
    line = by_name["fpn agp"]
    assert list(line.x) == [0.0, 0.2, 0.5, 0.9]
    assert line.y[0] == pytest.approx(DENSE_MIOU["fpn"])
    channel = by_name["fpn agp (channel)"]
    assert list(channel.x) == [0.0, 0.5, 0.9] and channel.y[0] == line.y[0]  # same dense start
    assert channel.meta["granularity"] == "channel" and channel.marker.symbol == "diamond-open"
    assert line.meta["granularity"] == "element"
    assert list(by_name["unet mp"].x) == [0.0, 0.2, 0.5]  # the 0.9 trial errored
    assert by_name["fpn dense"].meta["reference"] is True
    assert fig.layout.xaxis.title.text == "target sparsity"
    assert fig.layout.yaxis.title.text == "test mIoU"
    assert "sparsity" in fig.layout.title.text
    assert "Figure 8" in sparsity_figure(run.results, "nea").layout.title.text
    nea = {t.name: t for t in sparsity_figure(run.results, "nea").data}
    assert list(nea["linknet agp"].x) == [0.0, 0.2, 0.5]  # 0.9 still running
    assert RUNNING.endswith("s0.9")


def test_with_seeds_each_point_is_a_mean_with_its_interval(run) -> None:
    one = {t.name: t for t in sparsity_figure(run.results, "synthetic").data}
    assert one["fpn agp"].error_y.array is None  # one seed: no interval to draw
    three = seeded(run, spread=0.01)
    fig = sparsity_figure(three.results, "synthetic")
    by_name = {t.name: t for t in fig.data}
    line = by_name["fpn agp"]
    assert list(line.x) == [0.0, 0.2, 0.5, 0.9]  # one point per sparsity, not per seed
    assert list(line.y) == pytest.approx(list(one["fpn agp"].y))  # offsets -s, 0, +s: same mean
    bars = list(line.error_y.array)
    assert bars[0] == pytest.approx(0.0, abs=1e-12)  # the fake seeds share their dense models
    assert all(b == pytest.approx(4.302653 * 0.01 / 3**0.5) for b in bars[1:])
    assert list(line.customdata) == [3, 3, 3, 3]
    assert "mean over up to 3 seeds" in fig.layout.title.text
    pareto = latency_pareto_figure(three.results, "synthetic")
    points = [t for t in pareto.data if t.meta and not t.meta.get("front")]
    assert sum(len(t.x) for t in points) == sum(
        len(t.x) for t in latency_pareto_figure(run.results, "synthetic").data
        if t.meta and not t.meta.get("front")
    )  # fmt: skip
    assert any(t.error_y.array is not None for t in points)


def test_per_class_figure_one_panel_per_class(run) -> None:
    names = run.class_names["nea"]
    fig = per_class_figure(run.results, "nea", names)
    assert [a.text for a in fig.layout.annotations] == names
    axes = {t.xaxis for t in fig.data}
    assert axes == {"x", "x2", "x3"}
    assert sum(t.showlegend is not False for t in fig.data) == len(fig.data) // 3
    assert fig.layout.yaxis.title.text == "test IoU"


def test_examples_figure_shows_one_variant(run) -> None:
    example = examples(run)["synthetic"]
    fig = examples_figure(run.results, example, "synthetic", run.class_names["synthetic"])
    images = [t for t in fig.data if t.type == "image"]
    assert len(images) == len(fig.data)
    visible = [t for t in images if t.visible is not False]
    rows = len(example["gt"])
    assert len(visible) == rows * (2 + 3)  # image, truth and one mask per model
    assert {t.name for t in visible} >= {"fpn lp s0.9", "unet lp s0.9"}
    assert fig.layout.meta["kind"] == "examples" and fig.layout.meta["pruner"] == "lp"
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:5] == ["image", "ground truth", "unet", "fpn", "linknet"]
    assert "severe red" in titles[-1] and "ignore grey" in titles[-1]
    shown = examples_figure(run.results, example, "synthetic", [], show=("none", 0.0))
    assert {t.name for t in shown.data if t.visible is not False} >= {"fpn dense"}


def test_colorize_and_png() -> None:
    mask = np.array([[0, 1], [2, 3], [255, 7]], dtype=np.uint8)
    rgb = colorize(mask)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [220, 20, 20]
    assert rgb[2, 0].tolist() == [128, 128, 128]
    uri = png_data_uri(rgb)
    png = base64.b64decode(uri.split(",", 1)[1])
    assert png.startswith(b"\x89PNG") and png[12:16] == b"IHDR"
    idat = png[png.index(b"IDAT") + 4 :]
    raw = zlib.decompressobj().decompress(idat)
    assert raw[:7] == b"\x00" + bytes(rgb[0].ravel())


def test_pareto_front_on_a_hand_made_case() -> None:
    cost = [1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0, np.nan, 0.5]
    miou = [0.5, 0.6, 0.55, 0.6, 0.7, 0.7, 0.65, 0.9, np.nan]
    # 0.55 at 2 and 0.6 at 3 are beaten by 0.6 at 2; 0.65 at 5 by 0.7 at 4; the twins at 4 both
    # stay; points with a NaN are never on the front and beat nothing.
    expected = [True, True, False, False, True, True, False, False, False]
    assert pareto_front(cost, miou).tolist() == expected
    assert pareto_front([], []).tolist() == []


def test_latency_pareto_figure(run) -> None:
    fig = latency_pareto_figure(run.results, "synthetic")
    by_name = {t.name: t for t in fig.data}
    assert fig.layout.xaxis.title.text == "median batch-1 latency (ms, cpu)"
    assert fig.layout.yaxis.title.text == "test mIoU"
    assert "latency" in fig.layout.title.text and "1 finished trial has no latency" in (
        fig.layout.title.text
    )
    # One point per finished trial with a latency (unet mp s0.9 errored).
    points = [t for t in fig.data if t.mode == "markers"]
    assert sum(len(t.x) for t in points) == 3 + 3 * 9 + 4 - 2
    assert NO_LATENCY not in {trial for t in points for trial in t.text}
    channel = by_name["fpn agp (channel)"]
    assert list(channel.text) == [
        "synthetic-fpn-agp-channel-s0.5",
        "synthetic-fpn-agp-channel-s0.9",
    ]
    assert channel.marker.symbol == "diamond-open" and "%{text}" in channel.hovertemplate
    assert by_name["fpn dense"].marker.symbol == "star" and by_name["fpn dense"].meta["reference"]
    assert by_name["fpn agp"].marker.color == channel.marker.color  # colour by model
    front = by_name["Pareto front"]
    assert front.line.shape == "hv" and front.meta == {"dataset": "synthetic", "front": True}
    # A staircase: cost and mIoU both rise along it.
    assert (np.diff(front.x) > 0).all() and (np.diff(front.y) > 0).all()
    # The cheapest points are the channel-pruned ones; the front ends at the best dense model.
    assert front.x[0] == pytest.approx(18 * 0.2) and front.y[-1] == pytest.approx(0.70)


def test_size_pareto_figure_and_a_run_without_sizes(run) -> None:
    fig = size_pareto_figure(run.results, "synthetic")
    assert fig.layout.xaxis.title.text == "compact export file size, fp32 (MiB)"
    front = next(t for t in fig.data if t.name == "Pareto front")
    assert front.x[0] == pytest.approx(40 * 0.1)  # fpn channel at 0.9 is the smallest file
    assert not fig.layout.annotations
    for figure in (size_pareto_figure, latency_pareto_figure):
        old = figure(run.results, "nea")  # written before final.json had `inference`
        assert len(old.data) == 0 and "nea" in old.layout.title.text
        assert "no finished trial's final.json has inference" in old.layout.annotations[0].text
        assert old.layout.yaxis.title.text == "test mIoU"
    gone = run.results.drop(columns=["latency_ms", "latency_device", "compact_mib"])
    assert latency_pareto_figure(gone, "synthetic").layout.annotations
    assert size_pareto_figure(gone, "synthetic").layout.annotations


def test_int8_figure_joins_each_trials_fp32_and_int8_points(run, tmp_path: Path) -> None:
    assert int8_rows(run.results, "synthetic").empty  # a run without INT8 records
    small = write_fake_run(
        tmp_path / "run", ("synthetic",), ("fpn", "linknet"), ("agp",), (0.5, 0.9)
    )
    write_int8_records(small)
    results = load_run(small).results
    fig = int8_figure(results, "synthetic")
    assert fig.layout.xaxis.title.text == "median batch-1 latency, ONNX Runtime CPU (ms)"
    assert fig.layout.yaxis.title.text == "test mIoU"
    assert "fp32 and INT8, synthetic" in fig.layout.title.text
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {
        f"{m} {s}" for m in ("fpn", "linknet") for s in ("dense", "agp", "agp (channel)")
    }
    agp = by_name["fpn agp"]  # per trial: its fp32 point, its INT8 point, a gap
    assert list(agp.marker.symbol) == ["diamond", "x", "diamond"] * 2  # fp32 as in the Pareto plots
    assert by_name["fpn agp (channel)"].marker.symbol[:2] == ("diamond-open", "x")
    assert by_name["fpn dense"].marker.symbol[0] == "star" and agp.line.dash == "dash"
    row = results.set_index("trial").loc["synthetic-fpn-agp-s0.5"]
    assert list(agp.x[:3]) == [row["onnx_latency_ms"], row["int8_latency_ms"], None]
    assert list(agp.y[:2]) == [row["test_miou"], row["int8_test_miou"]]
    assert list(agp.text[:2]) == ["synthetic-fpn-agp-s0.5 fp32", "synthetic-fpn-agp-s0.5 INT8"]
    assert (
        agp.marker.color == by_name["fpn dense"].marker.color != by_name["linknet agp"].line.color
    )
    assert by_name["fpn dense"].meta["reference"] and agp.meta["pruner"] == "agp"
    assert by_name["fpn agp (channel)"].meta["granularity"] == "channel"
    assert len(by_name["linknet agp"].x) == 3  # its refused s0.5 has no INT8 point

"""`corroprune report` on a partial run: tables, an offline page, and a note of what is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.report import atomic_write, build_report
from sweep.cli import main
from tests.analysis.fake_run import (
    ERRORED,
    INT8_REFUSED,
    NOT_STARTED,
    RUNNING,
    write_fake_run,
    write_int8_records,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report_dir(fake_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    build_report(fake_run_dir, out)
    return out


def test_tables_and_their_csv_twins(report_dir: Path, fake_run_dir: Path) -> None:
    results = pd.read_parquet(report_dir / "results.parquet")
    assert len(results) == len(list((fake_run_dir / "trials").iterdir()))
    assert set(results["status"]) == {"finished", "errored", "running"}
    csv = pd.read_csv(report_dir / "results.csv")
    assert csv["trial"].tolist() == results["trial"].tolist()
    curves = pd.read_parquet(report_dir / "curves.parquet")
    assert {"trial", "stage", "epoch", "global_epoch", "val_miou"} <= set(curves.columns)
    assert len(pd.read_csv(report_dir / "curves.csv")) == len(curves)
    assert not [p for p in report_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_page_is_self_contained_and_names_what_is_missing(report_dir: Path) -> None:
    page = (report_dir / "dashboard.html").read_text()
    assert "<script src=" not in page and "<link " not in page  # nothing fetched
    assert "Plotly.newPlot" in page and len(page) > 3_000_000  # plotly.js is inlined
    for name in (ERRORED, RUNNING, NOT_STARTED):
        assert name in page
    assert "What is missing" in page and "CUDA out of memory" in page
    for figure in ("Figure 4", "Figure 5", "Figure 6", "Figure 8", "Figure 10", "Per-class"):
        assert figure in page
    for facet in ("dataset", "model", "pruner", "sparsity"):
        assert f'id="filter-{facet}"' in page
    assert "MP unstable, worst at 20% sparsity" in page and "not run" in page


def test_page_has_the_pareto_plots_and_size_and_latency_columns(report_dir: Path) -> None:
    page = (report_dir / "dashboard.html").read_text()
    for dataset in ("synthetic", "nea"):
        for key in ("pareto_latency", "pareto_size"):
            assert f'id="fig-{dataset}-{key}"' in page
    assert "Test mIoU against latency, synthetic" in page
    assert "Test mIoU against model size, synthetic" in page
    assert "no latency measured yet" in page  # nea: a run from before the inference block
    for header in ("granularity", "deployed params", "GMACs", "compact MiB (fp32)", "latency ms"):
        assert f"<th>{header}</th>" in page
    assert 'id="filter-granularity"' in page and 'data-granularity="channel"' in page
    assert "synthetic-fpn-agp-channel-s0.9" in page
    results = pd.read_parquet(report_dir / "results.parquet").set_index("trial")
    assert results.loc["synthetic-fpn-agp-channel-s0.9", "latency_ms"] > 0
    assert results.loc["nea-fpn-dense", "granularity"] == "none"


def _section(page: str, dataset: str) -> str:
    start = page.index(f'<section class="dataset-section" data-dataset="{dataset}">')
    return page[start : page.index("</section>", start)]


def test_without_int8_records_no_int8_columns_or_figure(report_dir: Path) -> None:
    page = (report_dir / "dashboard.html").read_text()
    assert "fp32 and INT8" not in page and "<th>INT8" not in page and "-int8" not in page
    results = pd.read_parquet(report_dir / "results.parquet")
    assert results[["int8_test_miou", "int8_latency_ms"]].isna().all().all()


def test_report_shows_fp32_and_int8_side_by_side(tmp_path: Path) -> None:
    run_dir = write_fake_run(tmp_path / "run", models=("fpn", "linknet"), pruners=("agp",))
    write_int8_records(run_dir)
    build_report(run_dir, tmp_path / "report")
    page = (tmp_path / "report" / "dashboard.html").read_text()
    synthetic, nea = _section(page, "synthetic"), _section(page, "nea")
    assert 'id="fig-synthetic-int8"' in synthetic and "fig-nea-int8" not in page
    latency, int8, size = (
        synthetic.index(f'id="fig-synthetic-{k}"')
        for k in ("pareto_latency", "int8", "pareto_size")
    )
    assert latency < int8 < size  # right after the latency plot
    assert "<th>test mIoU</th><th>INT8 test mIoU</th>" in synthetic
    assert "<th>latency device</th><th>ONNX fp32 ms</th><th>INT8 ms</th>" in synthetic
    assert "<th>INT8" not in nea  # no INT8 record in that dataset: no empty columns
    assert "<td>refused</td>" in synthetic and f"INT8 export refused: {INT8_REFUSED}" in page
    results = pd.read_parquet(tmp_path / "report" / "results.parquet").set_index("trial")
    assert results.loc["synthetic-fpn-dense", "int8_status"] == "exported"
    assert results.loc["synthetic-fpn-dense", "int8_latency_ms"] > 0


def test_report_command(own_run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(own_run_dir)]) == 0
    out = capsys.readouterr().out
    assert "1 errored, 1 running" in out and f"missing: errored: {ERRORED}" in out
    assert (own_run_dir / "report" / "dashboard.html").is_file()
    assert main(["report", str(own_run_dir / "nope")]) == 2


def test_report_of_a_run_with_no_trials_yet(tmp_path: Path) -> None:
    (tmp_path / "sweep.yaml").write_text("preset: demo\n")
    summary = build_report(tmp_path)
    assert summary["counts"] == "0 trials: 0 finished, 0 errored, 0 running"
    assert "No trials yet" in (tmp_path / "report" / "dashboard.html").read_text()


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_analysis_needs_neither_torch_nor_ray() -> None:
    code = (
        "import sys, analysis.cli, analysis.report, analysis.dashboard_app; "
        "bad = {'torch', 'ray'} & set(sys.modules); assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=60)

"""The static page and the live Dash app: their logic, then both opened in headless chromium."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from analysis.collect import load_run
from analysis.dashboard_app import (
    RunCache,
    create_app,
    facet_options,
    filter_run,
    updated_filters,
    view,
)
from analysis.report import build_report
from tests.analysis.browser import (
    RENDERED_PLOTS_JS,
    VISIBLE_TRACES_JS,
    chromium,
    require_browser,
    save_screenshot,
    severe_console_errors,
)
from tests.analysis.fake_run import RUNNING


def wait_for(check: Callable[[], object], timeout: float = 30.0, what: str = "condition"):
    """Poll until `check()` is truthy; its value is returned."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > end:
            assert value, f"timed out after {timeout}s waiting for {what}"
            return value
        time.sleep(0.2)


def settled(read: Callable[[], object], what: str, timeout: float = 60.0):
    """Poll until `read()` is truthy and gives the same value three times, a second apart (the
    app's callbacks have landed): a value read mid-render is not the page's value."""
    seen: list = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        seen = [*seen[-2:], read()]
        if len(seen) == 3 and seen[0] and seen[0] == seen[1] == seen[2]:
            return seen[0]
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} to settle")


@contextmanager
def serving(app) -> Iterator[str]:
    """The Dash app's Flask server on a free localhost port, in a thread."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def finish_running_trial(run_dir: Path) -> None:
    """What the sweep does when the running trial ends: final.json (written last)."""
    trials = run_dir / "trials"
    shutil.copy(trials / "nea-linknet-agp-s0.5" / "final.json", trials / RUNNING / "final.json")


def test_filter_run_keeps_dense_references(fake_run_dir: Path) -> None:
    run = load_run(fake_run_dir)
    shown = filter_run(run, ["fpn"], ["lp"], [0.9])
    assert set(shown.results["trial"]) == {
        "synthetic-fpn-dense",
        "synthetic-fpn-lp-s0.9",
        "nea-fpn-dense",
        "nea-fpn-lp-s0.9",
    }
    assert set(shown.curves["trial"]) == set(shown.results["trial"])
    options = facet_options(run)
    assert options["sparsity"] == [0.2, 0.5, 0.9] and options["pruner"] == ["lp", "agp", "mp"]
    assert options["granularity"] == ["element", "channel"]
    assert "synthetic-fpn-agp-channel-s0.9" in set(
        filter_run(run, ["fpn"], ["agp"], [0.9]).results["trial"]
    )
    channel = filter_run(run, ["fpn"], ["agp"], [0.9], ["channel"])
    assert set(channel.results["trial"]) == {
        "synthetic-fpn-dense",
        "synthetic-fpn-agp-channel-s0.9",
        "nea-fpn-dense",
    }


def test_view_rereads_the_run_when_it_changes(own_run_dir: Path) -> None:
    cache = RunCache(own_run_dir)
    out = view(cache, "nea", ["fpn", "linknet"], ["agp"], [0.9])
    assert out["status"].startswith("63 trials: 61 finished, 1 errored, 1 running")
    names = [t.name for t in out["sparsity"].data]
    assert names == ["fpn dense", "fpn agp", "linknet dense"]  # linknet agp 0.9 still running
    assert out["examples"].layout.meta["pruner"] == "agp"
    assert {"pareto_latency", "pareto_size"} <= set(out)
    headers = [th.children for th in out["trials"].children[0].children]
    assert "latency ms" in headers and "compact MiB (fp32)" in headers
    rows = [tr.className for tr in out["trials"].children[1:]]  # fpn and linknet: dense, agp 0.9
    assert rows == ["status-finished"] * 3 + ["status-running"]
    synthetic = view(cache, "synthetic", ["fpn"], ["agp"], [0.9], ["channel"])
    assert [t.name for t in synthetic["pareto_latency"].data] == [
        "fpn dense",
        "fpn agp (channel)",
        "Pareto front",
    ]
    assert synthetic["examples"].layout.meta["granularity"] == "channel"
    version = cache.version
    cache.get()
    assert cache.version == version  # nothing changed: nothing re-read
    finish_running_trial(own_run_dir)
    out = view(cache, "nea", ["fpn", "linknet"], ["agp"], [0.9])
    assert cache.version == version + 1 and "62 finished, 1 errored, 0 running" in out["status"]
    assert "linknet agp" in [t.name for t in out["sparsity"].data]


def test_only_a_cheap_poll_listens_to_the_timer(fake_run_dir: Path) -> None:
    """A render on every tick never lands once a render takes longer than the tick (each newer
    request makes Dash drop the older one): the timer may only move the run's version."""
    app = create_app(fake_run_dir, refresh_s=1.0)
    on_tick = [
        key
        for key, callback in app.callback_map.items()
        if any(i["id"] == "tick" for i in callback["inputs"])
    ]
    assert on_tick == ["run-version.data"]
    rendering = [key for key in app.callback_map if "status.children" in key]
    assert len(rendering) == 1
    inputs = {i["id"] for i in app.callback_map[rendering[0]]["inputs"]}
    assert "run-version" in inputs and "tick" not in inputs


def test_seed_filter_keeps_the_chosen_seeds_dense_models_included(fake_run_dir: Path) -> None:
    run = load_run(fake_run_dir)
    assert facet_options(run)["seed"] == [0]  # a run from before the seed axis: seed 0
    assert not filter_run(run, ["fpn"], ["lp"], [0.9], seeds=[1]).results.size
    kept = filter_run(run, ["fpn"], ["lp"], [0.9], seeds=[0]).results["trial"]
    assert set(kept) == set(filter_run(run, ["fpn"], ["lp"], [0.9]).results["trial"])


def test_updated_filters_tick_new_values_and_keep_unticked_ones() -> None:
    options = {
        "dataset": ["nea"],
        "model": ["fpn", "unet"],
        "pruner": ["lp"],
        "granularity": ["element", "channel"],
        "sparsity": [0.5],
        "seed": [0, 1],
    }
    old_options = [
        [{"label": "fpn", "value": "fpn"}],
        [{"label": "lp", "value": "lp"}],
        [{"label": "element", "value": "element"}],
        [],
        [{"label": "0", "value": 0}],
    ]
    old_values = [[], ["lp"], ["element"], [], [0]]
    dataset, new_options, values = updated_filters(options, "gone", old_options, old_values)
    assert dataset == "nea"
    # fpn stays unticked; unet, channel, 0.5 and seed 1 are new
    assert values == [["unet"], ["lp"], ["element", "channel"], [0.5], [0, 1]]
    assert new_options[3] == [{"label": "0.5", "value": 0.5}]


def test_dashboard_command_binds_to_localhost_by_default() -> None:
    from sweep.cli import build_parser

    args = build_parser().parse_args(["dashboard", "some/run"])
    assert (args.host, args.port) == ("127.0.0.1", 8050)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    require_browser()
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


def test_report_page_in_a_browser(browser, fake_run_dir: Path, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    build_report(fake_run_dir, tmp_path)
    browser.get((tmp_path / "dashboard.html").as_uri())
    plots = len(browser.find_elements("css selector", ".js-plotly-plot"))
    assert plots == 16  # eight figures for each of the two datasets
    wait_for(lambda: browser.execute_script(RENDERED_PLOTS_JS) == plots, what="plots with svg")
    all_traces = browser.execute_script(VISIBLE_TRACES_JS)
    save_screenshot(browser, tmp_path / "report-dashboard.png")

    Select(browser.find_element("id", "filter-model")).select_by_value("fpn")
    fpn_traces = browser.execute_script(VISIBLE_TRACES_JS)
    assert 0 < fpn_traces < all_traces
    Select(browser.find_element("id", "filter-dataset")).select_by_value("nea")
    sections = browser.find_elements("css selector", ".dataset-section")
    assert [s.is_displayed() for s in sections] == [True, False]  # nea first, synthetic hidden
    Select(browser.find_element("id", "filter-pruner")).select_by_value("mp")
    Select(browser.find_element("id", "filter-sparsity")).select_by_value("0.2")
    title = browser.execute_script(
        "return document.getElementById('fig-nea-examples').layout.title.text"
    )
    assert title.endswith(": mp s0.2")
    # Figure 6 now shows exactly one trial: fpn, mp, 0.2.
    shown = browser.execute_script(
        "return document.getElementById('fig-nea-pruning').data"
        ".filter(t => t.visible !== false).map(t => t.name)"
    )
    assert shown == ["fpn mp s0.2"]
    save_screenshot(browser, tmp_path / "report-dashboard-filtered.png")
    browser.find_element("id", "filter-reset").click()
    assert browser.execute_script(VISIBLE_TRACES_JS) == all_traces
    assert severe_console_errors(browser) == []


def test_live_dashboard_in_a_browser(browser, own_run_dir: Path, tmp_path: Path) -> None:
    with serving(create_app(own_run_dir, refresh_s=1.0)) as url:
        browser.get(url)
        wait_for(lambda: browser.execute_script(RENDERED_PLOTS_JS) == 8, 60, "eight plots")
        status = browser.find_element("id", "status")
        wait_for(lambda: "1 running" in status.text, what="the status line")
        model_boxes = "#filter-model input[type=checkbox]"
        boxes = wait_for(
            lambda: (
                len(b := browser.find_elements("css selector", model_boxes)) == 3
                and all(x.is_selected() for x in b)
                and b
            ),
            what="three ticked model boxes",
        )
        # the filters are filled in: the render for all models follows; count it once it lands
        count = settled(lambda: browser.execute_script(VISIBLE_TRACES_JS), "the traces")
        save_screenshot(browser, tmp_path / "live-dashboard.png")
        boxes[0].click()  # untick the first model
        wait_for(lambda: 0 < browser.execute_script(VISIBLE_TRACES_JS) < count, what="fewer traces")

        finish_running_trial(own_run_dir)  # the sweep moves on; the page must follow
        wait_for(lambda: "0 running" in status.text, 30, "the refresh to pick it up")
        ticked = lambda: [  # noqa: E731
            b.is_selected() for b in browser.find_elements("css selector", model_boxes)
        ]
        wait_for(lambda: ticked() == [False, True, True], what="the unticked model to stay so")
        assert severe_console_errors(browser) == []

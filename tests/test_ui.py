"""End-to-end UI test: the real `dagster-webserver` over a materialized home, driven by headless Chromium.

Starts the webserver on the repo's `workspace.yaml` in its own process group, opens the global
asset lineage and the `slides/raw_slide` asset page with Playwright (Debian's chromium, no
downloaded browsers) and checks that the four slide assets, their materialized partitions and
the asset description really show up in the rendered UI.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import BASE_ENV
from tests.services.dagster_services import stop_group, tail

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SLIDE_ASSETS = ("raw_slide", "preprocessed_slide_standard", "preprocessed_slide_staig", "slide_qc_metrics")
RAW_SLIDE_DESCRIPTION = "Raw counts of one Visium slide"
SLIDES = ("demo_01", "demo_02")
STARTUP_TIMEOUT_S = 120
UI_TIMEOUT_MS = 30_000


def _playwright_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"the playwright Python package cannot be imported ({exc}); install the dev extras"
    return None


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (Debian package `chromium`); the UI test drives that browser"
    return _playwright_missing()


# Decided at collection so a skipped UI test does not pay for the `materialized_home` fixture.
_SKIP = _skip_reason()
pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.timeout(900),  # includes building the session's materialized home when run alone
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"dagster-webserver exited with code {proc.returncode} before answering; "
                f"log {log}:\n{tail(log)}"
            )
        try:
            with urllib.request.urlopen(f"{base}/server_info", timeout=5) as resp:
                if resp.status == 200:
                    return
                last_error = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = repr(exc)
        time.sleep(0.5)
    pytest.fail(
        f"dagster-webserver did not answer {base}/server_info within {STARTUP_TIMEOUT_S} s "
        f"(last error: {last_error}); log {log}:\n{tail(log)}"
    )


def _skip_community_dialog(page) -> None:
    """A fresh browser profile shows a 'Join the Dagster community' dialog; dismiss it if present."""
    skip = page.get_by_role("button", name="Skip", exact=True)
    try:
        skip.wait_for(state="visible", timeout=5_000)
    except Exception:  # noqa: BLE001 - playwright TimeoutError; the dialog is optional
        return
    skip.click()
    skip.wait_for(state="hidden", timeout=10_000)


def test_webserver_shows_materialized_slide_assets(materialized_home, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    webserver = Path(sys.executable).with_name("dagster-webserver")
    assert webserver.exists(), f"dagster-webserver not found beside {sys.executable}"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "dagster-webserver.log"
    graph_png = tmp_path / "asset_graph.png"
    asset_png = tmp_path / "raw_slide.png"
    partitions_png = tmp_path / "raw_slide_partitions.png"
    page_errors: list[str] = []

    with log.open("w") as log_fh:
        proc = subprocess.Popen(
            [str(webserver), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env={**BASE_ENV, **materialized_home},
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        _wait_for_server(base, proc, log)

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(UI_TIMEOUT_MS)
                page.on("pageerror", lambda exc: page_errors.append(str(exc)))

                # --- global asset lineage: one box per asset group, slides feeding embeddings ---
                page.goto(f"{base}/asset-groups")
                expect(page.get_by_text("Global asset lineage")).to_be_visible()
                _skip_community_dialog(page)
                # With every family loaded the global graph is zoomed out past its labels;
                # the group graphs below are where names are checked.
                page.screenshot(path=str(graph_png).replace(".png", "_groups.png"), full_page=True)


                # --- the slides group graph: raw_slide drawn as a node, feeding the embedding assets ---
                page.goto(f"{base}/locations/mihd/asset-groups/slides")
                _skip_community_dialog(page)
                # Graph nodes are HTML inside the SVG's <foreignObject>s (the sidebar list is not).
                graph = page.locator("svg foreignObject")
                try:
                    expect(graph.get_by_text("raw_slide", exact=True)).to_be_visible()
                    expect(graph.get_by_text("2 partitions", exact=True).first).to_be_visible()
                    expect(graph.get_by_text("100% filled", exact=True).first).to_be_visible()
                    # The observable source of the slide's files feeds raw_slide, and downstream
                    # assets of other groups appear as links (lineage across groups).
                    expect(graph.get_by_text("slide_files", exact=True)).to_be_visible()
                    expect(graph.get_by_text("vision_uni2_standard", exact=True).filter(visible=True).first).to_be_visible()
                except AssertionError as exc:
                    page.screenshot(path=str(graph_png), full_page=True)
                    raise AssertionError(f"slides group graph incomplete; screenshot {graph_png}; log {log}") from exc
                page.screenshot(path=str(graph_png), full_page=True)

                # --- every slide asset has a page with a materialization ---
                for name in SLIDE_ASSETS:
                    page.goto(f"{base}/assets/slides/{name}")
                    _skip_community_dialog(page)
                    expect(page.get_by_text(name, exact=True).filter(visible=True).first).to_be_visible()
                    expect(page.get_by_text("Latest materialization")).to_be_visible()

                # --- raw_slide asset page: description and the latest materialization ---
                page.goto(f"{base}/assets/slides/raw_slide")
                _skip_community_dialog(page)
                try:
                    expect(page.get_by_text(RAW_SLIDE_DESCRIPTION)).to_be_visible()
                    expect(page.get_by_text("Latest materialization")).to_be_visible()
                    # The overview names the partition of the latest materialization (one of the slides).
                    expect(page.get_by_text("slide_id", exact=True)).to_be_visible()
                    expect(page.get_by_text(re.compile(r"^demo_0[12]$")).first).to_be_visible()
                finally:
                    page.screenshot(path=str(asset_png), full_page=True)

                # --- raw_slide partitions tab: both slides materialized ---
                page.goto(f"{base}/assets/slides/raw_slide?view=partitions")
                _skip_community_dialog(page)
                try:
                    expect(page.get_by_text("Materialized (2)", exact=True)).to_be_visible()
                    expect(page.get_by_text("Missing (0)", exact=True)).to_be_visible()
                    expect(page.get_by_text("Failed (0)", exact=True)).to_be_visible()
                    for slide in SLIDES:
                        expect(page.get_by_text(slide, exact=True).first).to_be_visible()
                finally:
                    page.screenshot(path=str(partitions_png), full_page=True)
            finally:
                browser.close()
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nscreenshots in {tmp_path} (graph: {graph_png}); page errors: {page_errors}\n"
            f"webserver log tail ({log}):\n{tail(log)}"
        ) from exc
    finally:
        stop_group(proc)

    # The lineage screenshot is a rendered page at the viewport's width, not a blank one.
    with Image.open(graph_png) as shot:
        size, colours = shot.size, len(set(shot.convert("RGB").resize((320, 200)).getdata()))
    assert size[0] == 1600 and size[1] >= 1000 and colours > 50, f"lineage screenshot {graph_png}: {size}, {colours} colours"
    assert not page_errors, (
        f"uncaught JavaScript errors in the Dagster UI: {page_errors}; screenshots in {tmp_path}; "
        f"webserver log {log}"
    )

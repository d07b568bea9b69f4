"""The built leaderboard site in headless Chromium (Debian's /usr/bin/chromium through Playwright):
every page renders and draws its charts, the highest ARI has the longest bar and bar lengths
are proportional to the scores (the axis starts at zero), no request leaves the machine (every
request not for a local file is aborted and recorded), and no script from submitted text runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mihd_relay.queue import SubmissionQueue
from tests.leaderboard.helpers import make_bundle, noisy_labels, platform_slide, rehash
from tests.leaderboard.platform_fixture import ingest_and_build, make_platform
from tests.test_ui import CHROMIUM, CHROMIUM_ARGS, _skip_reason

_SKIP = _skip_reason()
pytestmark = [pytest.mark.ui, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""), pytest.mark.timeout(300)]

PWNED = "window.__mihdPwned"
HOSTILE_NAME = "<script>window.__mihdPwned=1</script>"
HOSTILE_DESCRIPTION = "<img src=x onerror=\"window.__mihdPwned=2\">"
CLIENT = "f" * 32


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """A platform with two slides and two platform clusterings; two accepted submissions and a
    hostile one (HTML in its name and description, written to the queue past the relay)."""
    monkeypatch = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("leaderboard_site")
    s1, s2 = platform_slide("s1", n=150, layers=4, seed=0), platform_slide("s2", n=100, layers=5, seed=1)
    platform = make_platform(tmp, [s1, s2], {"gene_pca__kmeans": {"s1": (0.42, 0.40), "s2": (0.38, 0.41)},
                                             "gene_pca__mclust": {"s1": (0.55, 0.52), "s2": (0.61, 0.58)}})
    queue = SubmissionQueue(platform.queue, max_queued=100)
    queue.receive(make_bundle({"s1": noisy_labels(s1, 0.03), "s2": noisy_labels(s2, 0.03)}, name="BandFinder"), CLIENT)
    queue.receive(make_bundle({"s1": noisy_labels(s1, 0.9, seed=3)}, name="Sloppy"), CLIENT)
    hostile = make_bundle({"s1": noisy_labels(s1, 0.1)}, name="placeholder")
    hostile["method"]["name"], hostile["method"]["description"] = HOSTILE_NAME, HOSTILE_DESCRIPTION
    hostile = rehash(hostile)
    receipt = "99999999999999999999-abcdefabcdefabcd"
    (platform.queue / f"{receipt}.json").write_text(json.dumps({
        "format": "mihd-relay-queue/1", "receipt_id": receipt, "received_at": "2026-11-02T10:00:00+00:00",
        "client": CLIENT, "bundle": hostile}))
    try:
        ingest_and_build(platform, monkeypatch)
    finally:
        monkeypatch.undo()
    return platform


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Visit:
    """One browser context whose every request is recorded; any not for a local file is aborted."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.requests: list[str] = []
        self.aborted: list[str] = []
        self.errors: list[str] = []

        def route(route):
            url = route.request.url
            if url.startswith("file://"):
                route.continue_()
            else:
                self.aborted.append(url)
                route.abort()

        self.context.route("**/*", route)
        self.page = self.context.new_page()
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("console", lambda msg: self.errors.append(f"console {msg.type}: {msg.text}")
                     if msg.type in ("error", "warning") else None)

    def open(self, path: Path, charts: int = 1):
        self.page.goto(path.as_uri())
        if charts:
            self.page.wait_for_selector(f"body[data-charts-drawn='{charts}']", timeout=30_000)
            self.page.wait_for_selector("#chart-1 .barlayer .point path", state="attached", timeout=30_000)
        return self.page

    def bars(self, chart: str = "chart-1") -> tuple[list[float | None], list[float]]:
        """(the chart's values, each bar's drawn length in pixels), in data order."""
        values = self.page.evaluate(f"document.getElementById('{chart}').data[0].x")
        widths = self.page.eval_on_selector_all(f"#{chart} .barlayer .point path",
                                                "els => els.map(e => e.getBoundingClientRect().width)")
        return values, widths

    def ticks(self, chart: str = "chart-1") -> list[str]:
        """The chart's category labels as drawn, top to bottom."""
        found = self.page.eval_on_selector_all(
            f"#{chart} .ytick text", "els => els.map(e => [e.getBoundingClientRect().top, e.textContent])")
        return [text for _, text in sorted(found)]

    def close(self) -> None:
        self.context.close()

    def assert_offline_and_clean(self) -> None:
        assert self.aborted == [], f"requests that would have left the machine: {self.aborted}"
        assert all(u.startswith(("file://", "data:")) for u in self.requests), self.requests
        assert self.errors == [], self.errors


def _assert_bars_from_zero(values, widths) -> None:
    assert len(values) == len(widths) > 1 and all(v is not None for v in values)
    top = max(range(len(values)), key=lambda i: values[i])
    assert max(range(len(widths)), key=lambda i: widths[i]) == top, (values, widths)
    for value, width in zip(values, widths):  # lengths in proportion to the values: the axis starts at 0
        assert width / widths[top] == pytest.approx(abs(value) / values[top], abs=0.02), (values, widths)


def test_index_ranks_entries_with_the_longest_bar_for_the_highest_ari(built_site, browser):
    entries = built_site.query("SELECT * FROM leaderboard_entries ORDER BY rank")
    assert entries["source"].tolist().count("submission") == 2 and len(entries) == 6
    assert entries.iloc[0]["method_name"] == "BandFinder"
    visit = Visit(browser)
    try:
        page = visit.open(built_site.site / "index.html")
        assert page.locator("h1").inner_text() == "MIHD spatial-domain leaderboard"
        assert page.locator("table tbody tr").count() == len(entries)
        values, widths = visit.bars()
        assert values == pytest.approx(entries["mean_ari"].tolist())
        _assert_bars_from_zero(values, widths)
        assert visit.ticks()[0] == "#1 BandFinder 1.0"  # the top label
        visit.assert_offline_and_clean()
    finally:
        visit.close()


def test_every_slide_and_method_page_renders_offline(built_site, browser):
    pages = sorted((built_site.site / "slides").glob("*.html")) + sorted((built_site.site / "methods").glob("*.html"))
    assert [p.name for p in pages if p.parent.name == "slides"] == ["s1.html", "s2.html"]
    assert len([p for p in pages if p.parent.name == "methods"]) == 6
    visit = Visit(browser)
    try:
        for path in pages:
            page = visit.open(path)
            assert page.locator("h1").inner_text().strip(), path
            assert page.locator("table tbody tr").count() >= 1, path
            if path.parent.name == "slides":
                _assert_bars_from_zero(*visit.bars())
        visit.assert_offline_and_clean()
    finally:
        visit.close()
    # plotly.js is one file for all pages, the installed package's own
    import plotly

    scripts = list((built_site.site / "assets").glob("plotly-*.min.js"))
    assert [s.name for s in scripts] == [f"plotly-{plotly.__version__}.min.js"]
    for path in pages:
        text = path.read_text()
        assert text.count("<script src=") == 2 and "cdn" not in text.lower() and "bdata" not in text


def test_submitted_html_shows_as_text_and_never_runs(built_site, browser):
    rejected = built_site.query("SELECT * FROM submissions WHERE status = 'rejected'")
    assert rejected["method_name"].tolist() == [HOSTILE_NAME] and "no HTML" in rejected["reason"].iloc[0]
    visit = Visit(browser)
    try:
        page = visit.open(built_site.site / "submissions.html", charts=0)
        cells = page.locator("td").all_inner_texts()
        assert HOSTILE_NAME in cells  # the method cell shows the name as text
        assert any(HOSTILE_DESCRIPTION.split("=")[0] in c for c in cells)  # the reason quotes the description
        assert page.evaluate(PWNED) is None
        assert page.locator("img").count() == 0
        visit.assert_offline_and_clean()
    finally:
        visit.close()


def test_hostile_names_in_the_database_stay_text_in_tables_and_charts(tmp_path, browser):
    """Defence in depth: were hostile text ever in the leaderboard's rows, tables, chart labels
    (plotly.js reads a few tags in labels) and links would still show it as text."""
    from mihd_assets.leaderboard.site import build_site

    names = [HOSTILE_NAME, "<a href=\"javascript:window.__mihdPwned=3\">click</a>", "<b onmouseover=x>bold</b>"]
    entries = pd.DataFrame({
        "rank": [1, 2, 3], "entry_id": ["submission--a", "submission--b", "submission--c"],
        "source": ["submission"] * 3, "method_name": names, "method_version": ["1", "2", "</script><script>x=1"],
        "submission_id": ["a", "b", "c"], "n_slides": [1, 1, 1], "slides": ["s1"] * 3,
        "mean_ari": [0.9, 0.5, 0.1], "mean_nmi": [0.8, 0.4, 0.1], "mean_chaos": [0.1] * 3, "mean_pas": [0.1] * 3,
        "random_weights": [False] * 3, "fallback": [False] * 3,
        "description": [HOSTILE_DESCRIPTION, "=HYPERLINK(\"https://evil.example\")", "plain"],
        "link": ["javascript:window.__mihdPwned=4", "https://example.org/x", "https://example.org/\"onmouseover=\""],
        "received_at": [pd.Timestamp("2026-11-02")] * 3, "content_hash": ["sha256:" + "0" * 64] * 3,
        "platform_version": ["0.1.0"] * 3, "platform_commit": [None] * 3,
    })
    scores = pd.DataFrame({"entry_id": entries["entry_id"], "source": entries["source"],
                           "method_name": names, "method_version": entries["method_version"],
                           "submission_id": entries["submission_id"], "slide_id": ["s1"] * 3, "n_replicates": [1] * 3,
                           "ari": entries["mean_ari"], "nmi": entries["mean_nmi"], "chaos": [0.1] * 3,
                           "pas": [0.1] * 3, "random_weights": [False] * 3, "fallback": [False] * 3})
    submissions = pd.DataFrame({"submission_id": ["a", "b", "c"], "received_at": entries["received_at"],
                                "method_name": names, "method_version": entries["method_version"],
                                "status": ["accepted"] * 3, "reason": [None] * 3, "duplicate_of": [None] * 3,
                                "content_hash": entries["content_hash"], "n_slides": [1] * 3, "slide_ids": ["s1"] * 3})
    site = tmp_path / "site"
    build_site(site, entries, scores, submissions, generated_at="now <b>")
    visit = Visit(browser)
    try:
        for path in [site / "index.html", site / "slides" / "s1.html", *sorted((site / "methods").glob("*.html"))]:
            page = visit.open(path)
            ticks = visit.ticks()
            assert page.evaluate(PWNED) is None, path
            assert page.locator("svg a").count() == 0 and page.locator("img").count() == 0, path
            assert page.locator("a[href^='javascript']").count() == 0, path
            if path.name == "index.html":
                assert ticks == [f"#1 {names[0]} 1", f"#2 {names[1]} 2", f"#3 {names[2]} </script><script>x=1"]
                assert page.locator("td").filter(has_text=names[1]).count() == 1
        page = visit.open(site / "methods" / "submission--a.html")
        assert page.locator("dd").filter(has_text=HOSTILE_DESCRIPTION).count() == 1
        assert page.locator("dd a").count() == 0  # a javascript: link is shown as text, not linked
        page = visit.open(site / "methods" / "submission--b.html")
        assert page.locator("dd a").get_attribute("href") == "https://example.org/x"
        page = visit.open(site / "methods" / "submission--c.html")
        assert page.locator("dd a").count() == 0  # quotes in a link: not an https URL the site links
        visit.assert_offline_and_clean()
    finally:
        visit.close()
    # A text cell a spreadsheet would run as a formula is quoted in the CSV download.
    assert "'=HYPERLINK(" in (site / "data" / "leaderboard.csv").read_text()
    assert "=HYPERLINK(" in json.dumps(json.loads((site / "data" / "leaderboard.json").read_text()))

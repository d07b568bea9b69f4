"""The benchmark report works offline and its bars follow the values (headless Chromium)."""

import re

import pandas as pd
import plotly
import pytest

from mihd_assets.reports.benchmark import benchmark_html
from tests.test_ui import CHROMIUM, CHROMIUM_ARGS, _skip_reason

ROWS = [
    # slide, representation, method, refinement, ari, nmi
    ("s1", "gene_pca", "mclust", "none", 0.62, 0.70),
    ("s1", "staig_fusion__hvg__uni2_staig_strict", "mclust", "majority_k15", 0.81, 0.78),
    ("s1", "gene_pca", "kmeans", "none", 0.20, 0.35),
    ("s2", "gene_pca", "mclust", "none", 0.40, 0.52),
    ("s2", "staig_fusion__hvg__uni2_staig_strict", "mclust", "majority_k15", 0.10, 0.20),
    ("s2", "gene_pca", "kmeans", "none", 0.05, 0.12),
]


def frame() -> pd.DataFrame:
    df = pd.DataFrame(ROWS, columns=["slide_id", "representation", "clustering_method", "refinement", "ari", "nmi"])
    df["clustering_method_used"] = df["clustering_method"]
    df["chaos"], df["pas"], df["weights"], df["profile"] = 0.1, 0.05, "random", "demo"
    return df


def test_page_is_self_contained_with_plain_lists_and_flags(tmp_path):
    page = benchmark_html(frame())
    assert not re.search(r"<script[^>]*\bsrc=", page), "plotly.js must be embedded, not loaded from a URL"
    assert f"plotly {plotly.__version__}" in page
    assert re.search(r'"y":\[0\.62,', page), "bar values must be plain JSON lists"
    calls = [c.split("</script>", 1)[0] for c in page.split("Plotly.newPlot(")[1:] if c.lstrip().startswith('"chart-')]
    assert len(calls) == 2 and not any('"bdata"' in c for c in calls)  # no typed-array encoding
    assert "RANDOM weights" in page
    with pytest.raises(ValueError, match="no clustering metrics"):
        benchmark_html(frame().iloc[0:0])


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_bar_heights_follow_the_values_in_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    path = tmp_path / "report.html"
    path.write_text(benchmark_html(frame()))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_())
        page.goto(path.as_uri())
        page.wait_for_selector("#chart-ari .bars path")
        heights = page.eval_on_selector_all(
            "#chart-ari .trace.bars",
            "traces => traces.map(t => Array.from(t.querySelectorAll('.point path')).map(p => p.getBBox().height))",
        )
        y_zero = page.evaluate("() => document.querySelector('#chart-ari').layout.yaxis.range[0]")
        browser.close()
    assert y_zero == 0
    # Traces are slides (s1, s2); bars are methods in the order of their mean ARI.
    df = frame()
    df["method"] = df["representation"] + df["clustering_method"] + df["refinement"]
    order = df.groupby("method")["ari"].mean().sort_values(ascending=False).index
    for trace_heights, (_, part) in zip(heights, df.groupby("slide_id")):
        values = part.set_index("method").loc[order, "ari"].to_numpy()
        assert len(trace_heights) == len(values)
        ratios = [h / v for h, v in zip(trace_heights, values)]
        assert max(ratios) / min(ratios) == pytest.approx(1.0, rel=0.03), (trace_heights, values)

"""The Plotly benchmark report: ARI / NMI by method and slide, one self-contained HTML file.

An earlier report drew high scores as short bars: plotly.js came from a CDN of another
version and numpy arrays were serialized as typed arrays that plotly.js could not read.
Here the installed package's own plotly.js is embedded, every series is a plain Python
list, and bar axes start at zero.
"""

from __future__ import annotations

import html

import pandas as pd


def method_label(row) -> str:
    refinement = "" if row["refinement"] == "none" else " +refine"
    return f"{row['representation']} · {row['clustering_method']}{refinement}"


def benchmark_figure(frame: pd.DataFrame, metric: str):
    import plotly.graph_objects as go

    data = frame.dropna(subset=[metric]).copy()
    data["method"] = data.apply(method_label, axis=1)
    order = data.groupby("method")[metric].mean().sort_values(ascending=False).index.tolist()
    fig = go.Figure()
    for slide_id, part in data.groupby("slide_id", sort=True):
        part = part.set_index("method").reindex(order)
        fig.add_trace(go.Bar(
            name=str(slide_id),
            x=[str(m) for m in order],
            y=[None if pd.isna(v) else float(v) for v in part[metric].tolist()],
        ))
    fig.update_layout(
        barmode="group", title=f"{metric.upper()} by method and slide", height=520,
        yaxis={"title": metric.upper(), "rangemode": "tozero", "range": [0, max(1.0, float(data[metric].max()))]},
        xaxis={"tickangle": -40, "automargin": True}, legend_title_text="slide",
    )
    return fig


def benchmark_html(frame: pd.DataFrame, title: str = "MIHD benchmark") -> str:
    """A complete offline HTML page (plotly.js embedded) with ARI and NMI bar charts and the table."""
    import plotly
    import plotly.io as pio

    if frame.empty:
        raise ValueError("no clustering metrics with truth labels to report; materialize the evaluation/clustering_metrics/* assets first")
    charts = [pio.to_html(benchmark_figure(frame, m), full_html=False, include_plotlyjs=(i == 0),
                          div_id=f"chart-{m}") for i, m in enumerate(("ari", "nmi"))]
    flags = []
    if (frame["weights"] == "random").any():
        flags.append("Some results come from encoders with RANDOM weights (demo/offline run): they say nothing "
                     "about the published models.")
    if (frame["clustering_method_used"] != frame["clustering_method"]).any():
        flags.append("Some clusterings ran a configured FALLBACK instead of the requested method.")
    table = frame.sort_values(["slide_id", "ari"], ascending=[True, False])[
        ["slide_id", "representation", "clustering_method", "clustering_method_used", "refinement", "ari", "nmi",
         "chaos", "pas", "weights", "profile"]
    ].to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd}.flag{color:#a40000;font-weight:bold}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>"
        f"<p>plotly {plotly.__version__} (plotly.js embedded; works offline). {len(frame)} rows from DuckDB "
        "<code>clustering_latest</code>.</p>"
        + "".join(f"<p class='flag'>{html.escape(f)}</p>" for f in flags)
        + "".join(charts) + "<h2>All rows</h2>" + table + "</body></html>"
    )

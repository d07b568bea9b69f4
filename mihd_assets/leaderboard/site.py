"""The public leaderboard as a static folder: open ``index.html`` from the file system, or copy
the folder to any static host.

    index.html                     ranking of every entry (mean over its slides) + chart
    slides/<slide>.html            one slide: every entry's scores on it
    methods/<entry>.html           one entry: what it is, its scores per slide
    submissions.html               every submission read from the queue, accepted or rejected, and why
    data/*.csv, data/*.json        each table of those pages (data/slides/, data/methods/ for theirs)
    assets/plotly-<version>.min.js the installed plotly package's own plotly.js, once for all pages
    assets/site.js, assets/site.css

An earlier leaderboard drew high scores as short bars (plotly.js from elsewhere, of another
version, reading typed arrays it did not understand). Here the charts are plain JSON lists
drawn by the plotly.js of the installed Python package, bar axes include zero, and no page
loads anything from the network: the Content-Security-Policy of every page allows only
local scripts and no connections. Every text from the database is HTML-escaped, in tables
and in chart labels (plotly.js reads a few tags in labels; escaped, they show as text), and
the chart data sits in ``<script type="application/json">`` blocks with ``<``, ``>`` and ``&``
escaped, which browsers never run.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from mihd_assets.fileio import atomic_write_text

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")
HTTPS_LINK = re.compile(r"https://[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?(/[A-Za-z0-9._~:/?#@!$&'()*+,;=%-]*)?")
CSP = ("default-src 'none'; script-src 'self' file:; style-src 'self' file: 'unsafe-inline'; "
       "img-src 'self' file: data:; font-src 'self' file:; connect-src 'none'; base-uri 'none'; form-action 'none'")
PLATFORM_COLOUR = "#4c72b0"
SUBMISSION_COLOUR = "#dd8452"
SCORE_COLUMNS = ("ari", "nmi", "chaos", "pas")
# Columns of the submissions log that are published (the client address hash is not).
PUBLIC_SUBMISSION_COLUMNS = ("submission_id", "received_at", "method_name", "method_version", "status", "reason",
                             "duplicate_of", "content_hash", "n_slides", "slide_ids")
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

SITE_JS = """// Draws every chart of the page from its JSON block with the local plotly.js.
(function () {
  "use strict";
  function draw() {
    var blocks = document.querySelectorAll("script.mihd-chart");
    for (var i = 0; i < blocks.length; i++) {
      var spec = JSON.parse(blocks[i].textContent);
      var target = document.getElementById(blocks[i].getAttribute("data-target"));
      Plotly.newPlot(target, spec.data, spec.layout, spec.config);
    }
    document.body.setAttribute("data-charts-drawn", String(blocks.length));
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
"""

SITE_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{padding:3px 9px;border-bottom:1px solid #ddd;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}.flag{color:#a40000;font-weight:bold}
.source-platform{color:#4c72b0}.source-submission{color:#b35a1f}.status-rejected{color:#a40000}
nav a{margin-right:1em}code{font-size:12px}.note{color:#555;font-size:13px}
"""


# --------------------------------------------------------------------------- small helpers

def esc(value) -> str:
    """Any value as HTML text (None and NaN as an empty cell)."""
    value = _plain(value)
    if value is None:
        return ""
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    value = _plain(value)
    if value is None:
        return ""
    return f"{float(value):.{digits}f}"


def slug(name: str) -> str:
    """A file name for an entry or slide id: the id itself when it is a plain name, else a hash."""
    if SAFE_NAME.fullmatch(name) and ".." not in name:
        return name
    return "h-" + hashlib.sha256(name.encode()).hexdigest()[:20]


def script_json(value) -> str:
    """JSON that is safe inside a <script> element: no '<', '>' or '&' characters at all."""
    text = json.dumps(value, allow_nan=False, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _plain(value):
    """A JSON value of plain Python types (numpy scalars, timestamps, NaN and NA are not)."""
    if value is None or value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def records(frame: pd.DataFrame) -> list[dict]:
    return [{str(k): _plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def csv_text(frame: pd.DataFrame) -> str:
    """CSV with text cells that a spreadsheet would run as a formula prefixed by a quote."""
    safe = frame.copy()
    for column in safe.columns:
        if safe[column].dtype == object:
            safe[column] = safe[column].map(
                lambda v: "'" + v if isinstance(v, str) and v.startswith(CSV_FORMULA_START) else v)
    return safe.to_csv(index=False)


def plotly_text(text: str) -> str:
    """Text for a plotly.js label: it reads a few tags (<b>, <a href>, <br>) and decodes
    &lt; &gt; &amp; back, so escaping those three shows any text as it is (quotes stay:
    plotly.js does not decode &quot;)."""
    return html.escape(str(text), quote=False)


def bar_chart(labels: list[str], values: list, title: str, axis_title: str, colours: list[str],
              hover: list[str] | None = None, value_range: tuple[float, float] | None = None) -> dict:
    """A horizontal bar chart spec (plain lists), first label on top, the value axis from zero."""
    clean = [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v) for v in values]
    present = [v for v in clean if v is not None]
    lo = min([0.0, *present])
    hi = max([*present, 0.0]) if value_range is None else value_range[1]
    if value_range is not None:
        lo = min(lo, value_range[0])
        hi = max(hi, *present) if present else hi
    if hi <= lo:
        hi = lo + 1.0
    text = [plotly_text(t) for t in (hover or labels)]
    return {
        "data": [{
            "type": "bar", "orientation": "h",
            "y": [plotly_text(label) for label in labels],
            "x": clean,
            "marker": {"color": list(colours)},
            "hovertext": text, "hoverinfo": "text+x",
        }],
        "layout": {
            "title": {"text": plotly_text(title)},
            "height": max(260, 26 * len(labels) + 140),
            "margin": {"l": 20, "r": 30, "t": 50, "b": 50},
            "xaxis": {"title": {"text": plotly_text(axis_title)}, "range": [lo, hi], "zeroline": True,
                      "rangemode": "tozero", "fixedrange": True},
            "yaxis": {"type": "category", "autorange": "reversed", "automargin": True, "fixedrange": True},
            "showlegend": False,
        },
        "config": {"displaylogo": False, "responsive": True, "displayModeBar": False},
    }


# --------------------------------------------------------------------------- pages

class Page:
    def __init__(self, title: str, depth: int, plotly_file: str):
        self.title, self.depth, self.plotly_file = title, depth, plotly_file
        self.parts: list[str] = []
        self.n_charts = 0

    @property
    def root(self) -> str:
        return "../" * self.depth

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def chart(self, spec: dict) -> None:
        self.n_charts += 1
        target = f"chart-{self.n_charts}"
        self.add(f"<div id='{target}' class='chart'></div>"
                 f"<script type='application/json' class='mihd-chart' data-target='{target}'>{script_json(spec)}</script>")

    def html(self) -> str:
        nav = (f"<nav><a href='{self.root}index.html'>Leaderboard</a>"
               f"<a href='{self.root}submissions.html'>Submissions</a></nav>")
        scripts = (f"<script src='{self.root}assets/{self.plotly_file}'></script>"
                   f"<script src='{self.root}assets/site.js'></script>") if self.n_charts else ""
        return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
                "<meta name='referrer' content='no-referrer'>"
                "<meta name='viewport' content='width=device-width, initial-scale=1'>"
                f"<title>{html.escape(self.title)}</title>"
                f"<link rel='stylesheet' href='{self.root}assets/site.css'></head><body>"
                f"{nav}<h1>{html.escape(self.title)}</h1>" + "".join(self.parts) + scripts + "</body></html>")


def table(frame: pd.DataFrame, columns: list[tuple[str, str]], links: dict[str, callable] | None = None,
          classes: dict[str, callable] | None = None) -> str:
    """An HTML table of ``frame``: ``columns`` as (column, heading); ``links[column](row)`` gives a
    relative href for that cell; every cell is escaped."""
    links, classes = links or {}, classes or {}
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in columns)
    rows = []
    for row in frame.to_dict(orient="records"):
        cells = []
        for column, _ in columns:
            value = row.get(column)
            numeric = column in SCORE_COLUMNS or column.startswith("mean_") or column in (
                "rank", "n_slides", "n_spots", "n_labelled", "n_labels", "n_replicates")
            if column in SCORE_COLUMNS or column.startswith("mean_"):
                text = fmt(value)
            else:
                text = esc(value)
            href = links[column](row) if column in links and text else ""
            if href:
                text = f"<a href='{html.escape(href, quote=True)}'>{text}</a>"
            css = ["num"] if numeric else []
            if column in classes:
                css.append(classes[column](row))
            cells.append(f"<td class='{' '.join(html.escape(c) for c in css)}'>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _downloads(root: str, stem: str) -> str:
    return (f"<p class='note'>Download this table: <a href='{root}data/{stem}.csv'>CSV</a> · "
            f"<a href='{root}data/{stem}.json'>JSON</a></p>")


def _entry_label(row: dict) -> str:
    version = f" {row['method_version']}" if isinstance(row.get("method_version"), str) and row["method_version"] else ""
    return f"#{int(row['rank'])} {row['method_name']}{version}"


def _write(folder: Path, relative: str, text: str, written: list[str]) -> None:
    atomic_write_text(folder / relative, text)
    written.append(relative)


def _data(folder: Path, stem: str, frame: pd.DataFrame, written: list[str]) -> None:
    _write(folder, f"data/{stem}.csv", csv_text(frame), written)
    _write(folder, f"data/{stem}.json", json.dumps(records(frame), indent=1, allow_nan=False), written)


def build_site(target: str | os.PathLike, entries: pd.DataFrame, scores: pd.DataFrame, submissions: pd.DataFrame,
               *, generated_at: str) -> dict:
    """Write the site into ``target`` (replaced whole) from the ``leaderboard_entries``,
    ``leaderboard_scores`` and ``submissions`` rows; returns what was written.

    The new site is built in a temporary folder beside ``target`` (every file written
    atomically), then takes the place of the old one."""
    import plotly
    from plotly.offline import get_plotlyjs

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.building-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    written: list[str] = []
    try:
        plotly_file = f"plotly-{plotly.__version__}.min.js"
        _write(staging, f"assets/{plotly_file}", get_plotlyjs(), written)
        _write(staging, "assets/site.js", SITE_JS, written)
        _write(staging, "assets/site.css", SITE_CSS, written)
        entries = entries.sort_values("rank").reset_index(drop=True)
        entry_slug = {e: f"{slug(e)}" for e in entries["entry_id"]}
        slide_ids = sorted(scores["slide_id"].unique()) if len(scores) else []
        slide_slug = {s: slug(s) for s in slide_ids}
        public_submissions = submissions[[c for c in PUBLIC_SUBMISSION_COLUMNS if c in submissions.columns]]
        _index(staging, entries, slide_ids, slide_slug, entry_slug, plotly_file, generated_at, written)
        for slide_id in slide_ids:
            _slide_page(staging, slide_id, slide_slug[slide_id], scores, entries, entry_slug, plotly_file, written)
        for entry in entries.to_dict(orient="records"):
            _method_page(staging, entry, entry_slug[entry["entry_id"]], scores, slide_slug, plotly_file, written)
        _submissions_page(staging, public_submissions, entry_slug, plotly_file, written)
        _data(staging, "leaderboard", entries.drop(columns=["submission_id"], errors="ignore"), written)
        _data(staging, "scores", scores, written)
        _data(staging, "submissions", public_submissions, written)
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        if target.exists():
            os.rename(target, old)
        os.rename(staging, target)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return {"folder": str(target), "files": sorted(written), "n_entries": len(entries), "n_slides": len(slide_ids),
            "plotly_version": plotly.__version__}


ENTRY_COLUMNS = [("rank", "#"), ("method_name", "method"), ("method_version", "version"), ("source", "source"),
                 ("n_slides", "slides"), ("mean_ari", "ARI"), ("mean_nmi", "NMI"), ("mean_chaos", "CHAOS"),
                 ("mean_pas", "PAS")]
SCORE_NOTE = ("<p class='note'>ARI and NMI: agreement with the annotated layers (higher is better). CHAOS and PAS: "
              "spatial continuity of the domains (lower is better). Every score is computed by the platform from the "
              "per-spot labels and its own truth; numbers a submitter states are never used.</p>")


def _index(folder, entries, slide_ids, slide_slug, entry_slug, plotly_file, generated_at, written) -> None:
    page = Page("MIHD spatial-domain leaderboard", 0, plotly_file)
    n_platform = int((entries["source"] == "platform").sum()) if len(entries) else 0
    page.add(f"<p>{len(entries)} entries: {n_platform} platform methods, {len(entries) - n_platform} accepted "
             f"submissions; {len(slide_ids)} slides. Built {html.escape(generated_at)} from the platform's DuckDB "
             "views <code>leaderboard_entries</code> and <code>leaderboard_scores</code>.</p>" + SCORE_NOTE)
    if len(entries) and entries["random_weights"].fillna(False).astype(bool).any():
        page.add("<p class='flag'>Some platform entries come from encoders with RANDOM weights (a demo or offline "
                 "run): they say nothing about the published models.</p>")
    if len(entries):
        rows = entries.to_dict(orient="records")
        page.chart(bar_chart([_entry_label(r) for r in rows], [r["mean_ari"] for r in rows],
                             "Mean ARI over each entry's slides", "ARI",
                             [PLATFORM_COLOUR if r["source"] == "platform" else SUBMISSION_COLOUR for r in rows],
                             value_range=(0.0, 1.0)))
        page.add(table(entries, ENTRY_COLUMNS,
                       links={"method_name": lambda r: f"methods/{entry_slug[r['entry_id']]}.html"},
                       classes={"source": lambda r: f"source-{r['source']}"}))
    else:
        page.add("<p>No entries yet: no platform method has been scored on a slide with truth labels and no "
                 "submission has been accepted.</p>")
    page.add(_downloads("", "leaderboard"))
    page.add("<h2>Slides</h2><ul>" + "".join(
        f"<li><a href='slides/{html.escape(slide_slug[s], quote=True)}.html'>{esc(s)}</a></li>" for s in slide_ids)
        + "</ul>")
    page.add("<p class='note'>All scores per entry and slide: <a href='data/scores.csv'>CSV</a> · "
             "<a href='data/scores.json'>JSON</a>. Every submission and why it was accepted or not: "
             "<a href='submissions.html'>submissions</a>.</p>")
    _write(folder, "index.html", page.html(), written)


def _slide_page(folder, slide_id, name, scores, entries, entry_slug, plotly_file, written) -> None:
    ranks = entries.set_index("entry_id")["rank"]
    part = scores[scores["slide_id"] == slide_id].copy()
    part["rank"] = part["entry_id"].map(ranks)
    part = part.sort_values(["ari", "entry_id"], ascending=[False, True], na_position="last").reset_index(drop=True)
    part["slide_rank"] = range(1, len(part) + 1)
    page = Page(f"Slide {slide_id}", 1, plotly_file)
    page.add(SCORE_NOTE)
    rows = part.to_dict(orient="records")
    labels = [f"#{r['slide_rank']} {r['method_name']}" + (f" {r['method_version']}" if isinstance(
        r.get("method_version"), str) and r["method_version"] else "") for r in rows]
    page.chart(bar_chart(labels, [r["ari"] for r in rows], f"ARI on slide {slide_id}", "ARI",
                         [PLATFORM_COLOUR if r["source"] == "platform" else SUBMISSION_COLOUR for r in rows],
                         value_range=(0.0, 1.0)))
    columns = [("slide_rank", "#"), ("method_name", "method"), ("method_version", "version"), ("source", "source"),
               ("ari", "ARI"), ("nmi", "NMI"), ("chaos", "CHAOS"), ("pas", "PAS"), ("n_replicates", "replicates")]
    page.add(table(part, columns, links={"method_name": lambda r: f"../methods/{entry_slug[r['entry_id']]}.html"},
                   classes={"source": lambda r: f"source-{r['source']}"}))
    page.add(_downloads("../", f"slides/{name}"))
    _write(folder, f"slides/{name}.html", page.html(), written)
    _data(folder, f"slides/{name}", part.drop(columns=["submission_id"], errors="ignore"), written)


def _method_page(folder, entry, name, scores, slide_slug, plotly_file, written) -> None:
    part = scores[scores["entry_id"] == entry["entry_id"]].sort_values("slide_id").reset_index(drop=True)
    version = entry.get("method_version") if isinstance(entry.get("method_version"), str) else ""
    page = Page(f"{entry['method_name']} {version}".strip(), 1, plotly_file)
    facts = [("source", entry["source"]), ("rank", entry["rank"]), ("slides", entry["slides"]),
             ("mean ARI", fmt(entry["mean_ari"])), ("mean NMI", fmt(entry["mean_nmi"]))]
    if entry["source"] == "submission":
        facts += [("description", entry.get("description")), ("received", entry.get("received_at")),
                  ("receipt id", entry.get("submission_id")), ("content hash", entry.get("content_hash")),
                  ("platform version", entry.get("platform_version")), ("platform commit", entry.get("platform_commit"))]
    else:
        facts += [("what", "the platform's own method: the representation named first, clustered by the method named "
                           "second (+ the spatial refinement, when named), mean over replicates")]
        if entry.get("random_weights"):
            facts.append(("weights", "RANDOM (demo or offline run)"))
    body = "".join(f"<dt>{html.escape(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    link = entry.get("link")
    if isinstance(link, str) and HTTPS_LINK.fullmatch(link):
        body += (f"<dt>link</dt><dd><a href=\"{html.escape(link, quote=True)}\" rel='nofollow noopener noreferrer'>"
                 f"{html.escape(link)}</a></dd>")
    elif isinstance(link, str) and link:
        body += f"<dt>link (not an https URL; not linked)</dt><dd>{html.escape(link)}</dd>"
    page.add(f"<dl>{body}</dl>" + SCORE_NOTE)
    rows = part.to_dict(orient="records")
    page.chart(bar_chart([f"slide {r['slide_id']}" for r in rows], [r["ari"] for r in rows], "ARI per slide", "ARI",
                         [PLATFORM_COLOUR if entry["source"] == "platform" else SUBMISSION_COLOUR] * len(rows),
                         value_range=(0.0, 1.0)))
    page.add(table(part, [("slide_id", "slide"), ("ari", "ARI"), ("nmi", "NMI"), ("chaos", "CHAOS"), ("pas", "PAS"),
                          ("n_replicates", "replicates")],
                   links={"slide_id": lambda r: f"../slides/{slide_slug[r['slide_id']]}.html"}))
    page.add(_downloads("../", f"methods/{name}"))
    _write(folder, f"methods/{name}.html", page.html(), written)
    _data(folder, f"methods/{name}", part.drop(columns=["submission_id"], errors="ignore"), written)


def _submissions_page(folder, submissions, entry_slug, plotly_file, written) -> None:
    page = Page("Submissions", 0, plotly_file)
    n_accepted = int((submissions["status"] == "accepted").sum()) if len(submissions) else 0
    page.add(f"<p>{len(submissions)} submissions read from the relay's queue: {n_accepted} accepted, "
             f"{len(submissions) - n_accepted} rejected. A rejected one never reaches the leaderboard; its reason "
             "is shown as the platform recorded it.</p>")
    links = {"method_name": lambda r: (f"methods/{entry_slug['submission--' + r['submission_id']]}.html"
                                       if r["status"] == "accepted" and 'submission--' + r["submission_id"] in entry_slug
                                       else "")}
    shown = submissions.copy()
    page.add(table(shown, [("received_at", "received"), ("submission_id", "receipt"), ("method_name", "method"),
                           ("method_version", "version"), ("status", "status"), ("reason", "reason"),
                           ("duplicate_of", "duplicate of")],
                   links={k: v for k, v in links.items()},
                   classes={"status": lambda r: f"status-{r['status']}"}))
    page.add(_downloads("", "submissions"))
    _write(folder, "submissions.html", page.html(), written)

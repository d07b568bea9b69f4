"""The E1-E5 summary (markdown + self-contained HTML) built from the DuckDB views."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go

REPORT_QUERIES = {
    "e1": "SELECT * FROM segmentation_e1_summary",
    "e2": "SELECT * FROM segmentation_e2_curve",
    "e3": "SELECT * FROM segmentation_e3_gating",
    "e4": "SELECT * FROM segmentation_e4_sweep",
    "e5": "SELECT * FROM segmentation_e5_results",
    "models": "SELECT experiment, model, weights, config, profile, n_train_used, n_dropped_min_masks FROM segmentation_models ORDER BY experiment, model",
    "skipped": "SELECT donor_id, file, reason FROM skipped_tiles ORDER BY donor_id, file",
}


def _shown(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    shown = frame[[c for c in columns if c in frame.columns]].copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
    return shown


def _table(frame: pd.DataFrame, columns: list[str]) -> str:
    return "_no rows_\n" if frame.empty else _shown(frame, columns).to_markdown(index=False) + "\n"


def _html_table(frame: pd.DataFrame, columns: list[str]) -> str:
    return "<p><em>no rows</em></p>" if frame.empty else _shown(frame, columns).to_html(index=False, border=0)


def budget_curve(e2: pd.DataFrame) -> go.Figure:
    fig = go.Figure(go.Scatter(
        x=e2["budget"].astype(int).tolist(),
        y=e2["ap50_mean"].astype(float).tolist(),
        error_y={"type": "data", "array": e2["ap50_sd"].fillna(0).astype(float).tolist()},
        mode="lines+markers", name="AP50",
    ))
    top = float(np.nanmax((e2["ap50_mean"] + e2["ap50_sd"].fillna(0)).to_numpy())) if len(e2) else 1.0
    fig.update_layout(title="E2 label efficiency: test AP@0.5 vs training images (mean +/- sd over seeds)",
                      xaxis_title="training images", yaxis_title="AP@0.5", yaxis_range=[0, max(1e-3, top) * 1.1],
                      width=720, height=420)
    return fig


def forest_plot(e5: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for offset, (model, rows) in zip((-0.15, 0.15), e5.groupby("model", sort=True)):
        outcomes = rows["outcome"].tolist()
        y = [i + offset for i in range(len(outcomes))]
        fig.add_trace(go.Scatter(
            x=rows["rho"].astype(float).tolist(), y=y, mode="markers", name=model,
            error_x={"type": "data", "symmetric": False,
                     "array": (rows["ci_high"] - rows["rho"]).astype(float).tolist(),
                     "arrayminus": (rows["rho"] - rows["ci_low"]).astype(float).tolist()},
            text=[f"{o}: q={q:.3g}" for o, q in zip(outcomes, rows["q_value"].astype(float))],
        ))
        fig.update_yaxes(tickvals=list(range(len(outcomes))), ticktext=outcomes)
    fig.add_vline(x=0, line_dash="dash")
    fig.update_layout(title="E5 donor marker-positive ratio vs outcome: Spearman rho, bootstrap 95% CI",
                      xaxis_title="Spearman rho", xaxis_range=[-1, 1], width=720, height=480)
    return fig


def build_report(frames: dict[str, pd.DataFrame], context: dict) -> tuple[str, str]:
    """(markdown, html) of the E1-E5 results; ``context`` holds profile and run notes. Both are
    built from the same list of blocks, so the two documents say the same thing."""
    e5 = frames["e5"]
    significant = e5[e5["q_value"] < 0.05] if not e5.empty else e5
    figures: dict[str, go.Figure] = {}
    if not frames["e2"].empty:
        figures["e2"] = budget_curve(frames["e2"])
    if not e5.empty:
        figures["e5"] = forest_plot(e5)
    # blocks: ("h1"/"h2"/"p", text) | ("table", (frame, columns)) | ("figure", key)
    blocks: list[tuple[str, object]] = [
        ("h1", "Cellpose-SAM on ROSMAP immunofluorescence: E1-E5 summary"),
        ("p", f"Profile: **{context.get('profile')}**. Weights: {context.get('weights_line', '')}"),
        *[("p", f"- {line}") for line in context.get("notes", [])],
        ("h2", "E1 segmentation benchmark (test set, AP@0.5)"),
        ("table", (frames["e1"], ["model", "ap50", "precision", "recall", "f1", "tp", "fp", "fn", "weights", "config"])),
        ("p", "Models and training (min_train_masks drops are images not trained on):"),
        ("table", (frames["models"], ["experiment", "model", "weights", "config", "n_train_used", "n_dropped_min_masks"])),
        ("h2", "E2 label efficiency"),
        ("figure", "e2"),
        ("table", (frames["e2"], ["budget", "n_seeds", "ap50_mean", "ap50_sd", "f1_mean"])),
        ("h2", "E3 marker gating x minimum area"),
        ("table", (frames["e3"], ["model", "gating", "min_area", "ap50", "precision", "recall", "f1"])),
        ("h2", "E4 automatic-mask sweep"),
        ("table", (frames["e4"], ["model", "method", "points_per_side", "ap50", "precision", "recall", "f1"])),
        ("h2", "E5 donor-level association (Spearman, BH-FDR, tile bootstrap)"),
        ("figure", "e5"),
        ("table", (e5, ["model", "outcome", "n_donors", "n_dropped", "rho", "p_value", "q_value", "ci_low", "ci_high",
                        "sign_consistency", "note"])),
        ("p", "Associations at FDR < 0.05: "
         + (", ".join(f"{r.model}/{r.outcome} (rho {r.rho:.2f})" for r in significant.itertuples()) or "none")),
        ("p", f"Tiles skipped: {len(frames['skipped'])}"),
        ("table", (frames["skipped"], ["donor_id", "file", "reason"])),
    ]
    md: list[str] = []
    body: list[str] = []
    plotlyjs_done = False
    for kind, value in blocks:
        if kind == "h1":
            md += [f"# {value}", ""]
            body.append(f"<h1>{html.escape(value)}</h1>")
        elif kind == "h2":
            md += [f"## {value}", ""]
            body.append(f"<h2>{html.escape(value)}</h2>")
        elif kind == "p":
            md += [value, ""]
            text = html.escape(value).replace("**", "")
            body.append(f"<p>{text}</p>")
        elif kind == "table":
            frame, columns = value
            md.append(_table(frame, columns))
            body.append(_html_table(frame, columns))
        elif kind == "figure" and value in figures:
            # plotly.js of the installed plotly package is embedded once: the page works offline.
            body.append(figures[value].to_html(full_html=False, include_plotlyjs=False if plotlyjs_done else "inline"))
            plotlyjs_done = True
    markdown = "\n".join(md)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:0.5em 0 1.5em}th,td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Cellpose-SAM E1-E5</title>"
            f"<style>{style}</style></head><body>" + "".join(body) + "</body></html>")
    return markdown, page

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


def _table(frame: pd.DataFrame, columns: list[str]) -> str:
    if frame.empty:
        return "_no rows_\n"
    shown = frame[[c for c in columns if c in frame.columns]].copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
    return shown.to_markdown(index=False) + "\n"


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
    """(markdown, html) of the E1-E5 results; ``context`` holds profile and run notes."""
    e5 = frames["e5"]
    significant = e5[e5["q_value"] < 0.05] if not e5.empty else e5
    notes = [f"- {line}" for line in context.get("notes", [])]
    md = [
        "# Cellpose-SAM on ROSMAP immunofluorescence: E1-E5 summary",
        "",
        f"Profile: **{context.get('profile')}**. Weights: {context.get('weights_line', '')}",
        *notes,
        "",
        "## E1 segmentation benchmark (test set, AP@0.5)",
        _table(frames["e1"], ["model", "ap50", "precision", "recall", "f1", "tp", "fp", "fn", "weights", "config"]),
        "Models and training (min_train_masks drops are images not trained on):",
        "",
        _table(frames["models"], ["experiment", "model", "weights", "config", "n_train_used", "n_dropped_min_masks"]),
        "## E2 label efficiency",
        _table(frames["e2"], ["budget", "n_seeds", "ap50_mean", "ap50_sd", "f1_mean"]),
        "## E3 marker gating x minimum area",
        _table(frames["e3"], ["model", "gating", "min_area", "ap50", "precision", "recall", "f1"]),
        "## E4 automatic-mask sweep",
        _table(frames["e4"], ["model", "method", "points_per_side", "ap50", "precision", "recall", "f1"]),
        "## E5 donor-level association (Spearman, BH-FDR, tile bootstrap)",
        _table(e5, ["model", "outcome", "n_donors", "n_dropped", "rho", "p_value", "q_value", "ci_low", "ci_high",
                    "sign_consistency", "note"]),
        f"Associations at FDR < 0.05: "
        + (", ".join(f"{r.model}/{r.outcome} (rho {r.rho:.2f})" for r in significant.itertuples()) or "none"),
        "",
        f"Tiles skipped: {len(frames['skipped'])}",
        "",
        _table(frames["skipped"], ["donor_id", "file", "reason"]),
    ]
    markdown = "\n".join(md)
    figures = []
    if not frames["e2"].empty:
        figures.append(budget_curve(frames["e2"]))
    if not e5.empty:
        figures.append(forest_plot(e5))
    # plotly.js of the installed plotly package is embedded once: the page works offline.
    parts = [fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False) for i, fig in enumerate(figures)]
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Cellpose-SAM E1-E5</title></head><body>"
        + "".join(parts)
        + "<pre style='white-space:pre-wrap'>" + html.escape(markdown) + "</pre></body></html>"
    )
    return markdown, page

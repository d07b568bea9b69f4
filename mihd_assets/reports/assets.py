"""Report assets: per-slide figures from stored labels, and the offline Plotly benchmark."""

import base64

import numpy as np
from dagster import AssetExecutionContext, AssetIn, AssetKey, MaterializeResult, MetadataValue, asset

from mihd_resources.orchestration import slides_partitions
from mihd_assets.fileio import atomic_write_bytes, atomic_write_text
from mihd_assets.fusion.assets import ALL_METRICS_KEYS, IMAGE_FIGURE_KEYS, IMAGE_FREE_FIGURE_KEYS
from mihd_assets.slides.assets import RAW_SLIDE, has_image
from mihd_resources import MetricsStore, settings

from .benchmark import benchmark_html
from .figures import NO_IMAGE_PANEL, slide_panels_png

# First-panel title of a slide whose only image is the full-resolution TIFF (not stored in the AnnData).
FULLRES_ONLY_PANEL = "no hires or lowres image stored (full-resolution TIFF only): spot coordinates only"


def _display_image(raw, slide_id: str) -> tuple[np.ndarray | None, float, str]:
    """The stored hires (else lowres) image, its scale factor and the first panel's title;
    without a stored image None, 1.0 (full-resolution coordinates) and a title saying that
    the panel shows spot coordinates only."""
    info = raw.uns["spatial"][slide_id]
    for name in ("hires", "lowres"):
        if name in info.get("images", {}):
            return np.asarray(info["images"][name]), float(info["scalefactors"][f"tissue_{name}_scalef"]), "H&E"
    return None, 1.0, FULLRES_ONLY_PANEL if has_image(raw, slide_id) else NO_IMAGE_PANEL


def _figures_factory(name: str, clustering_keys: list[AssetKey], which: str):
    @asset(
        key=AssetKey(["reports", name]),
        ins={"__".join(k.path[1:]): AssetIn(key=k) for k in clustering_keys} | {"raw": AssetIn(key=RAW_SLIDE)},
        group_name="reports",
        partitions_def=slides_partitions,
        # 2: without a stored image the first panel draws the spot coordinates, titled as such.
        # 3: figures of the image-free clusterings and of those computed from pixels are two assets.
        code_version="3",
        kinds={"matplotlib"},
        description=(
            f"One PNG per clustering {which} of this slide: H&E | ground truth | prediction (refined labels), "
            "drawn only from the stored labels and the stored image; the best one is shown inline. Without a "
            "stored image the first panel shows the spot coordinates only, and says so."
        ),
    )
    def _asset(context: AssetExecutionContext, raw, **labels) -> MaterializeResult:
        return _draw(context, raw, labels, name)

    return _asset


def _draw(context: AssetExecutionContext, raw, labels: dict, name: str) -> MaterializeResult:
    slide_id = context.partition_key
    image, scale, image_title = _display_image(raw, slide_id)
    truth = raw.obs["truth"] if "truth" in raw.obs and raw.obs["truth"].notna().any() else None
    index = {b: i for i, b in enumerate(raw.obs_names)}
    out_dir = settings.storage_root() / "reports" / "slide_figures" / slide_id
    paths, previews = {}, {}
    for name_, stored in sorted(labels.items()):
        rows = [index[b] for b in stored.obs_names]
        xy = np.asarray(raw.obsm["spatial"], dtype=np.float64)[rows] * scale
        t = None if truth is None else truth.iloc[rows].astype(object).to_numpy()
        png = slide_panels_png(image, xy, t, stored.refined, f"{slide_id} · {name_} (refined)",
                               image_title=image_title)
        path = out_dir / f"{name_}.png"
        atomic_write_bytes(path, png)
        paths[name_] = MetadataValue.path(str(path))
        previews[name_] = png
    if not previews:
        raise ValueError(f"slide '{slide_id}': no stored clusterings to draw")
    shown = next(iter(sorted(previews)))
    context.log.info(f"slide {slide_id}: {len(paths)} figures ({name}) in {out_dir}")
    return MaterializeResult(metadata={
        "n_figures": len(paths),
        "first_panel": image_title,
        "folder": MetadataValue.path(str(out_dir)),
        "preview": MetadataValue.md(
            f"**{shown}**\n\n![{shown}](data:image/png;base64,{base64.b64encode(previews[shown]).decode()})"
        ),
        **{f"figure/{k}": v for k, v in paths.items()},
    })


# A slide without any image still gets the first (its clusterings need no pixels).
slide_figures = _figures_factory("slide_figures", IMAGE_FREE_FIGURE_KEYS,
                                 "that needs no image (gene embeddings, STAIG without its image branch)")
slide_figures_image = _figures_factory("slide_figures_image", IMAGE_FIGURE_KEYS,
                                       "computed from the slide's pixels (vision embeddings, fusions, image-only methods)")


@asset(
    key=AssetKey(["reports", "benchmark_report"]),
    deps=ALL_METRICS_KEYS,
    group_name="reports",
    code_version="1",
    kinds={"plotly", "duckdb"},
)
def benchmark_report(context: AssetExecutionContext, metrics: MetricsStore) -> MaterializeResult:
    """Offline Plotly HTML report of ARI and NMI by method and slide (plotly.js embedded,
    data as plain lists, bar axes from zero), read from DuckDB `clustering_latest`."""
    with metrics.connect() as con:
        frame = con.execute("SELECT * FROM clustering_latest WHERE metrics_status = 'ok'").df()
    page = benchmark_html(frame)
    path = settings.storage_root() / "reports" / "benchmark_report.html"
    atomic_write_text(path, page)
    top = (frame.groupby(["representation", "clustering_method", "refinement"])["ari"].mean()
           .sort_values(ascending=False).head(10).reset_index())
    return MaterializeResult(metadata={
        "path": MetadataValue.path(str(path)),
        "n_rows": len(frame),
        "n_slides": int(frame["slide_id"].nunique()),
        "top_methods_mean_ari": MetadataValue.md(top.to_markdown(index=False, floatfmt=".3f")),
    })

"""A small platform for the leaderboard tests: raw_slide files, a metrics catalog, a queue, and
the leaderboard's ingest + site assets run through Dagster on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mihd_assets.leaderboard.ingest import PlatformSlide


@dataclass
class Platform:
    root: Path
    store: Path
    database: Path
    queue: Path
    instance: object

    @property
    def env(self) -> dict[str, str]:
        return {"MIHD_HOME": str(self.root), "MIHD_STORAGE": str(self.store), "MIHD_DUCKDB": str(self.database),
                "MIHD_RELAY_QUEUE": str(self.queue)}

    @property
    def site(self) -> Path:
        return self.store / "reports" / "leaderboard_site"

    def resources(self) -> dict:
        from dagster_duckdb import DuckDBResource

        from mihd_resources import AnnDataIOManager, MetricsStore

        return {"metrics": MetricsStore(duckdb=DuckDBResource(database=str(self.database))),
                "anndata_io_manager": AnnDataIOManager(base_dir=str(self.store))}

    def query(self, sql: str) -> pd.DataFrame:
        from mihd_resources.metrics_store import read_only_query

        return read_only_query(self.database, sql)


def write_raw_slide(store: Path, slide: PlatformSlide) -> Path:
    """The parts of a raw_slide file the ingest reads (spots, truth, coordinates), where the
    AnnData IO manager keeps it."""
    import anndata as ad

    obs = pd.DataFrame({"truth": pd.Categorical([t if t is not None else np.nan for t in slide.truth])},
                       index=pd.Index(slide.barcodes, name="barcode"))
    adata = ad.AnnData(X=np.zeros((len(slide.barcodes), 1), dtype=np.float32), obs=obs)
    adata.obsm["spatial"] = slide.coords
    path = store / "slides" / "raw_slide" / f"{slide.slide_id}.h5ad"
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def platform_rows(slide_id: str, representation: str, method: str, ari: float, nmi: float) -> list[dict]:
    """`clustering_metrics` rows (raw and refined) of one platform clustering, as the evaluation assets write them."""
    rows = []
    for refinement, shift in (("none", 0.0), ("majority_k15", 0.02)):
        rows.append({"slide_id": slide_id, "representation": representation, "kind": "gene", "fusion_method": "",
                     "gene_encoder": representation.removeprefix("gene_"), "vision": "", "clustering_method": method,
                     "clustering_method_used": method, "refinement": refinement, "n_clusters": 4,
                     "n_clusters_source": "truth", "n_spots": 100, "n_labelled": 95, "ari": ari + shift,
                     "nmi": nmi + shift, "homogeneity": nmi, "completeness": nmi, "chaos": 0.05, "pas": 0.1,
                     "metrics_status": "ok", "weights": "none", "profile": "demo", "replicate": 0, "seed": 0,
                     "n_clusters_requested": 4, "n_clusters_found": 4})
    return rows


def make_platform(tmp: Path, slides: list[PlatformSlide], clusterings: dict[str, dict[str, tuple[float, float]]]) -> Platform:
    """Slides registered and stored; ``clusterings[name][slide] = (ari, nmi)`` written as the
    platform's `clustering_metrics` rows of ``evaluation/clustering_metrics/<name>``."""
    from dagster import DagsterInstance

    from mihd_resources.metrics_store import write_partition_tables

    platform = Platform(root=tmp, store=tmp / "storage", database=tmp / "mihd.duckdb", queue=tmp / "relay" / "queue",
                        instance=DagsterInstance.ephemeral())
    platform.instance.add_dynamic_partitions("slides", [s.slide_id for s in slides])
    for slide in slides:
        write_raw_slide(platform.store, slide)
    for name, per_slide in clusterings.items():
        representation, method = name.rsplit("__", 1)
        for slide_id, (ari, nmi) in per_slide.items():
            write_partition_tables(platform.database, None, f"evaluation/clustering_metrics/{name}", slide_id,
                                   {"clustering_metrics": platform_rows(slide_id, representation, method, ari, nmi)},
                                   run_id="test", code_version="1")
    return platform


def ingest_and_build(platform: Platform, monkeypatch):
    """Run the leaderboard's ingest and site assets through Dagster on ``platform``."""
    from dagster import materialize

    from mihd_assets.leaderboard.assets import leaderboard_site, leaderboard_submissions

    for key, value in platform.env.items():
        monkeypatch.setenv(key, value)
    result = materialize([leaderboard_submissions, leaderboard_site], instance=platform.instance,
                         resources=platform.resources())
    assert result.success
    return result

"""Leaderboard assets: the relay's queue (observable source), its ingest into DuckDB, the static site.

    reports/submission_queue         data version = the queued files' names and sizes
    reports/leaderboard_submissions  every queued bundle checked again, against the platform's slides, and
                                     re-scored: DuckDB `submissions` and `submission_scores`
    reports/leaderboard_site         the static leaderboard folder, from the DuckDB views
"""

import datetime as dt
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetObservation,
    DataVersion,
    DefaultSensorStatus,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    asset,
    define_asset_job,
    observable_source_asset,
    sensor,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG, extract_data_version_from_entry

from mihd_assets.fusion.assets import ALL_METRICS_KEYS
from mihd_assets.slides.assets import RAW_SLIDE
from mihd_relay.paths import queue_dir
from mihd_relay.queue import queue_fingerprint, queued_files
from mihd_resources import MetricsStore, settings
from mihd_resources.orchestration import slides_partitions
from mihd_resources.storage import InvalidPartitionKey, partition_path

from .ingest import PlatformSlide, ingest_queue
from .site import build_site

GROUP = "reports"
SUBMISSION_QUEUE = AssetKey(["reports", "submission_queue"])
LEADERBOARD_SUBMISSIONS = AssetKey(["reports", "leaderboard_submissions"])
LEADERBOARD_SITE = AssetKey(["reports", "leaderboard_site"])
INGEST_JOB_NAME = "leaderboard_ingest_job"
OBSERVE_QUEUE_JOB_NAME = "submission_queue_observe_job"


def site_folder() -> Path:
    return settings.storage_root() / "reports" / "leaderboard_site"


@observable_source_asset(
    key=SUBMISSION_QUEUE,
    group_name=GROUP,
    description=(
        "The relay's queue folder of submission bundles (`MIHD_RELAY_QUEUE`, default `$MIHD_HOME/relay/queue`). "
        "Its data version is a hash of the queued files' names and sizes (the relay never changes a queued file); a "
        "new version makes `leaderboard_submissions` unsynced. Observed by the queue sensor and `mihd materialize`."
    ),
)
def submission_queue(context):
    return DataVersion(queue_fingerprint(queue_dir()))


class _PlatformSlides:
    """The slides the platform holds: registered slide partitions with a stored raw_slide; each
    read once (spots, truth and coordinates only; the counts stay on disk)."""

    def __init__(self, instance, base_dir: str):
        self.base_dir = base_dir
        self.known = sorted(k for k in instance.get_dynamic_partitions(slides_partitions.name)
                            if self._path(k) is not None and self._path(k).is_file())
        self._cache: dict[str, PlatformSlide] = {}

    def _path(self, slide_id: str) -> Path | None:
        try:
            return partition_path(self.base_dir, slide_id, partitions=slides_partitions.name,
                                  prefix=tuple(RAW_SLIDE.path), suffix=".h5ad")
        except (InvalidPartitionKey, ValueError):
            return None

    def __call__(self, slide_id: str) -> PlatformSlide | None:
        if slide_id not in self.known:
            return None
        if slide_id not in self._cache:
            import anndata as ad
            import numpy as np

            raw = ad.read_h5ad(self._path(slide_id), backed="r")
            try:
                truth = (raw.obs["truth"].astype(object).where(raw.obs["truth"].notna(), None).to_numpy()
                         if "truth" in raw.obs else np.full(raw.n_obs, None, dtype=object))
                self._cache[slide_id] = PlatformSlide(slide_id, list(raw.obs_names), truth,
                                                      np.asarray(raw.obsm["spatial"], dtype=np.float64))
            finally:
                raw.file.close()
        return self._cache[slide_id]


def _frame(rows: list[dict], integers: tuple[str, ...] = (), floats: tuple[str, ...] = ()):
    """Rows as a DataFrame whose optional numbers are nullable (None stays NULL, never NaN)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.astype({**{c: "Int64" for c in integers}, **{c: "Float64" for c in floats}})


@asset(
    key=LEADERBOARD_SUBMISSIONS,
    deps=[SUBMISSION_QUEUE, RAW_SLIDE],
    group_name=GROUP,
    code_version="1",
    kinds={"python", "duckdb"},
    required_resource_keys={"metrics", "anndata_io_manager"},
    description=(
        "Every bundle in the relay's queue, checked again (file name, size, strict JSON, envelope, schema, content "
        "hash), de-duplicated by content hash, checked against the slides the platform holds (known slide with "
        "truth, every barcode a spot, every spot labelled, not wildly more labels than layers) and re-scored by the "
        "platform (ARI, NMI, CHAOS, PAS; submitted numbers ignored). DuckDB `submissions` (accepted / rejected + "
        "reason) and `submission_scores`, rewritten whole from the queue."
    ),
)
def leaderboard_submissions(context: AssetExecutionContext) -> MaterializeResult:
    metrics: MetricsStore = context.resources.metrics
    root = queue_dir()
    files = queued_files(root)
    slides = _PlatformSlides(context.instance, context.resources.anndata_io_manager.base_dir)
    result = ingest_queue(files, slides, slides.known)
    for name in result.ignored:
        context.log.warning(f"queue {root}: {name!r} is not named like a relay receipt (<20 digits>-<16 hex>.json); "
                            "not read")
    for row in result.rejected:
        context.log.info(f"submission {row['submission_id']} rejected: {row['reason']}")
    written = metrics.write(context, {"submissions": _frame(result.submissions, integers=("n_slides",)),
                                      "submission_scores": _frame(result.scores, floats=("claimed_ari", "claimed_nmi"))})
    return MaterializeResult(metadata={
        "queue": MetadataValue.path(str(root)),
        "queue_fingerprint": queue_fingerprint(root),
        "n_submissions": len(result.submissions),
        "n_accepted": len(result.accepted),
        "n_rejected": len(result.rejected),
        "n_duplicates": sum(1 for r in result.submissions if r["duplicate_of"]),
        "ignored_files": MetadataValue.json(result.ignored),
        "rows_written": MetadataValue.json(written),
        "slides_held": MetadataValue.json(slides.known),
    })


@asset(
    key=LEADERBOARD_SITE,
    deps=[*ALL_METRICS_KEYS, LEADERBOARD_SUBMISSIONS],
    group_name=GROUP,
    code_version="1",
    kinds={"html", "plotly", "duckdb"},
    description=(
        "The public leaderboard as a static folder (`<storage>/reports/leaderboard_site/`): index, one page per "
        "slide and per entry, the submissions log, CSV and JSON of every table; the platform's methods as built-in "
        "entries next to accepted submissions, scored ARI, NMI, CHAOS and PAS by the platform. plotly.js of the "
        "installed package once, charts as plain lists with bar axes from zero, every text escaped; opens from "
        "the file system with no network. Publish by copying the folder to any static host."
    ),
)
def leaderboard_site(context: AssetExecutionContext, metrics: MetricsStore) -> MaterializeResult:
    with metrics.connect() as con:
        entries = con.execute("SELECT * FROM leaderboard_entries ORDER BY rank").df()
        scores = con.execute("SELECT * FROM leaderboard_scores ORDER BY slide_id, entry_id").df()
        submissions = con.execute("SELECT * FROM submissions ORDER BY received_at NULLS LAST, submission_id").df()
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = build_site(site_folder(), entries, scores, submissions, generated_at=generated)
    top = entries.head(10)[["rank", "method_name", "source", "n_slides", "mean_ari", "mean_nmi"]]
    context.log.info(f"leaderboard site: {summary['n_entries']} entries, {summary['n_slides']} slides, "
                     f"{len(summary['files'])} files in {summary['folder']}")
    return MaterializeResult(metadata={
        "index": MetadataValue.path(str(Path(summary["folder"]) / "index.html")),
        "folder": MetadataValue.path(summary["folder"]),
        "n_entries": summary["n_entries"],
        "n_platform_entries": int((entries["source"] == "platform").sum()),
        "n_submission_entries": int((entries["source"] == "submission").sum()),
        "n_slides": summary["n_slides"],
        "n_files": len(summary["files"]),
        "plotly_version": summary["plotly_version"],
        "top_entries": MetadataValue.md(top.to_markdown(index=False, floatfmt=".3f") if len(top) else "(none)"),
    })


leaderboard_ingest_job = define_asset_job(
    INGEST_JOB_NAME,
    selection=[LEADERBOARD_SUBMISSIONS, LEADERBOARD_SITE],
    description="Ingest the relay's queue into DuckDB, then rebuild the leaderboard site.",
)

observe_queue_job = define_asset_job(
    OBSERVE_QUEUE_JOB_NAME,
    selection=[SUBMISSION_QUEUE],
    description="Observes the relay's queue folder; new files are a new data version of `reports/submission_queue`.",
)


@sensor(
    job=leaderboard_ingest_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Watches the relay's queue folder: when its files differ from the last observation of "
    "`reports/submission_queue`, records the new observation and runs the ingest and the site rebuild.",
)
def submission_queue_sensor(context: SensorEvaluationContext):
    root = queue_dir()
    fingerprint = queue_fingerprint(root)
    record = context.instance.get_latest_data_version_record(SUBMISSION_QUEUE, is_source=True)
    last = extract_data_version_from_entry(record.event_log_entry) if record else None
    files = queued_files(root)
    if last is not None and last.value == fingerprint:
        return SensorResult(skip_reason=f"queue {root} unchanged ({len(files)} files)")
    if last is None and not files:
        return SensorResult(skip_reason=f"queue {root} is empty and was never ingested")
    context.log.info(f"queue {root}: {len(files)} files, new fingerprint {fingerprint}; ingesting")
    return SensorResult(
        asset_events=[AssetObservation(asset_key=SUBMISSION_QUEUE, tags={DATA_VERSION_TAG: fingerprint},
                                       metadata={"n_files": len(files), "queue": str(root)})],
        run_requests=[RunRequest(run_key=None, tags={"mihd/reason": f"submission queue changed ({len(files)} files)"})],
    )

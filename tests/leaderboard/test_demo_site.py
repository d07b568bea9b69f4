"""The leaderboard site as `mihd materialize` built it on the tiny slides (the session's
materialized home, shared with the other end-to-end tests): every platform clustering scored on
a slide with truth is a built-in entry, with the scores of `clustering_over_seeds`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mihd_resources.metrics_store import read_only_query

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_materialize_builds_the_site_from_the_platforms_results(materialized_home):
    home = Path(materialized_home["MIHD_HOME"])
    database = home / "mihd.duckdb"
    methods = read_only_query(database, "SELECT DISTINCT representation, clustering_method, refinement "
                                        "FROM clustering_over_seeds")
    entries = read_only_query(database, "SELECT * FROM leaderboard_entries ORDER BY rank")
    assert len(methods) > 10 and len(entries) == len(methods)
    assert set(entries["source"]) == {"platform"}
    assert read_only_query(database, "SELECT count(*) AS n FROM submissions")["n"].iloc[0] == 0
    best = read_only_query(database, "SELECT avg(mean_ari) AS ari FROM clustering_over_seeds GROUP BY representation, "
                                     "clustering_method, refinement ORDER BY ari DESC LIMIT 1")["ari"].iloc[0]
    assert entries["mean_ari"].iloc[0] == pytest.approx(best)
    site = home / "storage" / "reports" / "leaderboard_site"
    published = json.loads((site / "data" / "leaderboard.json").read_text())
    assert [e["entry_id"] for e in published] == entries["entry_id"].tolist()
    assert len(list((site / "methods").glob("*.html"))) == len(entries)
    assert sorted(p.stem for p in (site / "slides").glob("*.html")) == ["demo_01", "demo_02"]


def test_a_submission_through_a_local_relay_appears_after_mihd_materialize(materialized_home, tmp_path):
    """The whole path on a private copy of the home: `mihd relay` started locally, `mihd submit
    --upload` against it, then `mihd materialize` observes the queue, ingests, re-scores and
    rebuilds the site; nothing else is recomputed."""
    import csv
    import shutil

    import anndata as ad
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from tests.conftest import run_cli
    from tests.leaderboard.helpers import Relay

    home = tmp_path / "home"
    shutil.copytree(materialized_home["MIHD_HOME"], home, symlinks=True)
    env = {**materialized_home, "MIHD_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home")}
    raw = ad.read_h5ad(home / "storage" / "slides" / "raw_slide" / "demo_01.h5ad")
    rng = np.random.default_rng(7)
    truth = raw.obs["truth"].astype(object).where(raw.obs["truth"].notna(), "outside").to_numpy()
    labels = {b: (str(rng.choice(truth)) if rng.random() < 0.2 else str(t)) for b, t in zip(raw.obs_names, truth)}
    labels_csv = tmp_path / "demo_01.csv"
    with open(labels_csv, "w", newline="") as fh:
        csv.writer(fh).writerows(labels.items())

    relay = Relay(home / "relay", env=env)  # its queue is the platform's default, $MIHD_HOME/relay/queue
    try:
        sent = run_cli(["submit", "--name", "Demo Submitter", "--version", "1.0", "--description", "Truth, 20% noise.",
                        "--link", "https://example.org/demo", "--labels", f"demo_01={labels_csv}",
                        "--relay", relay.base, "--upload"], env, timeout=300)
        assert sent.returncode == 0 and "queued: receipt id" in sent.stdout, sent.stdout + sent.stderr
    finally:
        relay.stop()
    result = run_cli(["materialize"], env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    database = home / "mihd.duckdb"
    (row,) = read_only_query(database, "SELECT * FROM submissions").to_dict(orient="records")
    assert row["status"] == "accepted" and row["method_name"] == "Demo Submitter", row
    (score,) = read_only_query(database, "SELECT * FROM submission_scores").to_dict(orient="records")
    known = raw.obs["truth"].notna().to_numpy()
    expected = adjusted_rand_score(raw.obs["truth"].astype(str).to_numpy()[known],
                                   np.asarray([labels[b] for b in raw.obs_names])[known])
    assert score["ari"] == pytest.approx(expected, abs=1e-12)
    entries = read_only_query(database, "SELECT * FROM leaderboard_entries")
    assert (entries["source"] == "submission").sum() == 1 and (entries["source"] == "platform").sum() > 10
    index = (home / "storage" / "reports" / "leaderboard_site" / "index.html").read_text()
    assert "Demo Submitter" in index
    # Only the leaderboard was planned: the slides' assets were in sync.
    again = run_cli(["materialize", "--dry-run"], env, timeout=600)
    assert again.returncode == 0 and "leaderboard" not in again.stdout.lower(), again.stdout[-3000:]

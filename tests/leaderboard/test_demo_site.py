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

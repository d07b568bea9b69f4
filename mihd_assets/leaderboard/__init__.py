"""The public leaderboard: ingest of relay-queued submissions (re-scored by the platform) and
the static site built from DuckDB. Pure modules: ``ingest`` and ``site``; Dagster wiring in
``assets`` and ``definitions``."""

"""Leaderboard submissions: the bundle format (``bundle``), the relay that queues bundles
(``app``, run by uvicorn through ``mihd relay``) and the client behind ``mihd submit`` (``client``).

Nothing here imports dagster: the relay is a small process that holds no credentials and
only validates, limits and queues what it receives.
"""

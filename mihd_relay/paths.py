"""Where the relay keeps its queue and salt. Importable without dagster (the relay process
never loads it); ``MIHD_HOME`` follows the rule of ``mihd_resources.settings.mihd_home``
(a test checks that both agree)."""

from __future__ import annotations

import os
from pathlib import Path


def mihd_home() -> Path:
    return Path(os.environ.get("MIHD_HOME", Path.cwd() / ".mihd")).resolve()


def queue_dir() -> Path:
    """The folder of queued bundles (``MIHD_RELAY_QUEUE``; default ``$MIHD_HOME/relay/queue``):
    the relay writes it, the ingest sensor and asset read it."""
    env = os.environ.get("MIHD_RELAY_QUEUE")
    return Path(env).resolve() if env else mihd_home() / "relay" / "queue"


def salt_file() -> Path:
    """The relay's salt for hashing client addresses (``MIHD_RELAY_SALT_FILE``; default
    ``$MIHD_HOME/relay/salt``), created once with mode 0600. Not a credential: it only keeps
    the stored address hashes from being reversed by trying every address."""
    env = os.environ.get("MIHD_RELAY_SALT_FILE")
    return Path(env).resolve() if env else mihd_home() / "relay" / "salt"

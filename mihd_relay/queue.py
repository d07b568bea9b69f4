"""The queue folder between the relay and the ingest asset.

    <queue>/<receipt id>.json        one accepted bundle in its envelope, written atomically, never changed
    <queue>/.by-hash/<sha256 hex>    the receipt id that first queued that content (made with link(2): atomic)

A receipt id is ``<time_ns, 20 digits>-<16 random hex digits>``: file names sort in the order
bundles arrived. The envelope holds the receipt id, the time it arrived, the client address
as a salted hash, and the bundle as the relay parsed and checked it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path

from mihd_assets.fileio import atomic_write_bytes

QUEUE_FORMAT = "mihd-relay-queue/1"
RECEIPT_RE = re.compile(r"[0-9]{20}-[0-9a-f]{16}")
HASH_INDEX = ".by-hash"


class QueueFull(RuntimeError):
    """The queue holds as many bundles as it may; nothing was written."""


def new_receipt_id() -> str:
    return f"{time.time_ns():020d}-{secrets.token_hex(8)}"


def queued_files(root: str | os.PathLike) -> list[Path]:
    """Every ``*.json`` file at the top of the queue, in name (arrival) order, whatever its name:
    the ingest decides what to make of names the relay would not write."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.suffix == ".json" and not p.name.startswith(".") and p.is_file())


def queue_fingerprint(root: str | os.PathLike) -> str:
    """Hash of the queued file names and sizes (queue files are never changed once written)."""
    digest = hashlib.sha256()
    for path in queued_files(root):
        digest.update(f"{path.name}|{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:20]


class SubmissionQueue:
    """The relay's side of the queue: one new file per accepted bundle, never two for the same content."""

    def __init__(self, root: str | os.PathLike, max_queued: int):
        self.root = Path(root)
        self.max_queued = max_queued
        (self.root / HASH_INDEX).mkdir(parents=True, exist_ok=True)

    def _marker(self, content_hash: str) -> Path:
        hex_digest = content_hash.removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", hex_digest):
            raise ValueError(f"not a content hash: {content_hash[:80]!r}")
        return self.root / HASH_INDEX / hex_digest

    def first_receipt(self, content_hash: str) -> str | None:
        marker = self._marker(content_hash)
        try:
            return marker.read_text().strip()
        except FileNotFoundError:
            return None

    def receive(self, bundle: dict, client: str) -> tuple[str, str | None, str]:
        """Queue a checked bundle: (receipt id, None, received_at) when new, (first receipt id,
        the same, "") when the same content was queued before. Raises :class:`QueueFull`."""
        if len(queued_files(self.root)) >= self.max_queued:
            raise QueueFull(f"the queue holds {self.max_queued} bundles, its limit")
        receipt = new_receipt_id()
        marker = self._marker(bundle["content_hash"])
        claim = marker.with_name(f".{receipt}.claim")
        claim.write_text(receipt + "\n")
        try:
            os.link(claim, marker)  # fails when the marker exists: one receipt per content
        except FileExistsError:
            first = self.first_receipt(bundle["content_hash"])
            return first or "(being queued)", first or "(being queued)", ""
        finally:
            claim.unlink(missing_ok=True)
        received_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        envelope = {"format": QUEUE_FORMAT, "receipt_id": receipt, "received_at": received_at, "client": client,
                    "bundle": bundle}
        try:
            atomic_write_bytes(self.root / f"{receipt}.json",
                               json.dumps(envelope, ensure_ascii=False, allow_nan=False).encode("utf-8"))
        except BaseException:
            marker.unlink(missing_ok=True)  # nothing was queued under it
            raise
        return receipt, None, received_at

"""Ingest of queued submissions: every check again, then the platform's own scores.

A queue file is input like any other: its name, size, envelope and bundle are checked as the
relay checked them (the relay may be another version, or something else may have written
the file). Then, per slide, against the slide the platform holds: the slide exists and has
truth labels, every submitted barcode is a spot of it, every spot has a label, and there are
not wildly more distinct labels than layers. An accepted bundle is scored by the platform
(ARI, NMI, homogeneity, completeness against its truth; CHAOS and PAS on its coordinates,
the functions behind ``clustering_metrics``); numbers the bundle claims are recorded and never
used. The same content a second time is rejected as a duplicate of the first.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from mihd_relay.bundle import Refusal, check_bundle, parse_json
from mihd_relay.queue import QUEUE_FORMAT, RECEIPT_RE

# Four times the relay's default body limit (the envelope adds little); nothing bigger is read.
MAX_QUEUE_FILE_BYTES = 16 * 1024 * 1024
ENVELOPE_KEYS = {"format", "receipt_id", "received_at", "client", "bundle"}
MAX_REASON_CHARS = 2000
MAX_REASONS = 5


def max_labels_for(n_layers: int) -> int:
    """Distinct labels a submission may use on a slide with ``n_layers`` truth layers."""
    return max(3 * n_layers, 10)


@dataclass
class PlatformSlide:
    """What the platform holds of one slide: its spots, their truth (None: unlabelled) and coordinates."""

    slide_id: str
    barcodes: list[str]
    truth: np.ndarray
    coords: np.ndarray

    def __post_init__(self):
        self.truth = np.asarray(self.truth, dtype=object)
        self.coords = np.asarray(self.coords, dtype=np.float64)
        if self.truth.shape != (len(self.barcodes),) or self.coords.shape != (len(self.barcodes), 2):
            raise ValueError(f"slide {self.slide_id}: truth {self.truth.shape} / coordinates {self.coords.shape} do "
                             f"not match {len(self.barcodes)} spots")

    @property
    def labelled(self) -> np.ndarray:
        return np.asarray([t is not None and not (isinstance(t, float) and np.isnan(t)) and str(t) != "nan"
                           for t in self.truth])

    @property
    def n_layers(self) -> int:
        return len({str(t) for t, known in zip(self.truth, self.labelled) if known})


@dataclass
class IngestResult:
    submissions: list[dict] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files in the queue that are not relay receipts

    @property
    def accepted(self) -> list[dict]:
        return [r for r in self.submissions if r["status"] == "accepted"]

    @property
    def rejected(self) -> list[dict]:
        return [r for r in self.submissions if r["status"] == "rejected"]


def _cut(value, limit: int) -> str | None:
    """Submitted text for a row: strings only, cut to ``limit`` characters."""
    return value[:limit] if isinstance(value, str) else None


def _get(obj, *path):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _timestamp(value) -> dt.datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return stamp


def _examples(values, n: int = 3) -> str:
    shown = sorted(values)[:n]
    return ", ".join(repr(v[:40]) for v in shown) + (", ..." if len(values) > n else "")


def _join(reasons: list[str]) -> str:
    text = "; ".join(reasons[:MAX_REASONS])
    if len(reasons) > MAX_REASONS:
        text += f"; ... and {len(reasons) - MAX_REASONS} more"
    return text[:MAX_REASON_CHARS]


def slide_problems(slide_id: str, labels: dict[str, str], platform: PlatformSlide | None, known: list[str]) -> list[str]:
    """Why the labels of one slide cannot be scored against the platform's slide (empty: they can)."""
    if platform is None:
        listed = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        return [f"slide {slide_id!r} is not on the platform (slides held: {listed or 'none'})"]
    problems = []
    spots = set(platform.barcodes)
    foreign = [b for b in labels if b not in spots]
    if foreign:
        problems.append(f"slide {slide_id!r}: {len(foreign)} submitted barcode(s) are not spots of the platform's slide "
                        f"(e.g. {_examples(foreign)})")
    missing = [b for b in platform.barcodes if b not in labels]
    if missing:
        problems.append(f"slide {slide_id!r}: {len(missing)} of {len(platform.barcodes)} spots have no label "
                        f"(e.g. {_examples(missing)}); every spot needs one")
    n_layers = platform.n_layers
    if n_layers == 0:
        problems.append(f"slide {slide_id!r} has no truth labels on the platform; it cannot be scored")
    else:
        distinct = len(set(labels.values()))
        if distinct > max_labels_for(n_layers):
            problems.append(f"slide {slide_id!r}: {distinct} distinct labels for {n_layers} layers; at most "
                            f"{max_labels_for(n_layers)} are accepted")
    return problems


def score_slide(labels: dict[str, str], platform: PlatformSlide) -> dict:
    """The platform's scores of one slide's labels (the functions behind ``clustering_metrics``)."""
    from mihd_assets.fusion.metrics import agreement, chaos, pas

    values = [labels[b] for b in platform.barcodes]
    codes = pd.factorize(pd.Series(values, dtype=object))[0]
    truth = np.asarray([t if known else None for t, known in zip(platform.truth, platform.labelled)], dtype=object)
    scores = agreement(truth, codes)
    return {
        "slide_id": platform.slide_id,
        "n_spots": len(platform.barcodes),
        "n_labelled": scores["n_labelled"],
        "n_labels": int(len(set(values))),
        "n_layers": platform.n_layers,
        "ari": scores["ari"], "nmi": scores["nmi"],
        "homogeneity": scores["homogeneity"], "completeness": scores["completeness"],
        "chaos": chaos(codes, platform.coords), "pas": pas(codes, platform.coords),
    }


def _envelope_problems(envelope, receipt: str) -> list[str]:
    if not isinstance(envelope, dict):
        return [f"queue envelope: a JSON object was expected, not {type(envelope).__name__}"]
    problems = []
    if set(envelope) != ENVELOPE_KEYS:
        problems.append(f"queue envelope: members {sorted(str(k)[:40] for k in envelope)} instead of "
                        f"{sorted(ENVELOPE_KEYS)}")
    if envelope.get("format") != QUEUE_FORMAT:
        problems.append(f"queue envelope: format is not {QUEUE_FORMAT!r}")
    if envelope.get("receipt_id") != receipt:
        problems.append("queue envelope: its receipt id is not the file's name")
    if _timestamp(envelope.get("received_at")) is None:
        problems.append("queue envelope: received_at is not an ISO time")
    client = envelope.get("client")
    if not (isinstance(client, str) and re.fullmatch(r"[0-9a-f]{32}", client)):
        problems.append("queue envelope: client is not a 32-hex-digit address hash")
    if not isinstance(envelope.get("bundle"), dict):
        problems.append("queue envelope: bundle is not a JSON object")
    return problems


def ingest_queue(files: list[Path], lookup: Callable[[str], PlatformSlide | None], known_slides: list[str]) -> IngestResult:
    """The ``submissions`` and ``submission_scores`` rows of every queued file, in arrival order.

    ``lookup(slide_id)`` gives the platform's slide or None when it holds no such slide;
    ``known_slides`` names the ones it holds (for the reason of an unknown slide)."""
    result = IngestResult()
    first_by_hash: dict[str, str] = {}
    for path in sorted(files, key=lambda p: p.name):
        receipt = path.name.removesuffix(".json")
        if not (path.name.endswith(".json") and RECEIPT_RE.fullmatch(receipt)):
            result.ignored.append(path.name[:200])
            continue
        row = {"submission_id": receipt, "queue_file": path.name, "received_at": None, "client_hash": None,
               "content_hash": None, "method_name": None, "method_version": None, "description": None, "link": None,
               "platform_version": None, "platform_commit": None, "n_slides": None, "slide_ids": None,
               "status": "rejected", "reason": None, "duplicate_of": None}
        result.submissions.append(row)
        size = path.stat().st_size
        if size > MAX_QUEUE_FILE_BYTES:
            row["reason"] = f"queue file is {size} bytes; files over {MAX_QUEUE_FILE_BYTES} bytes are not read"
            continue
        try:
            envelope = parse_json(path.read_bytes())
        except Refusal as refusal:
            row["reason"] = f"queue file: {refusal.reason}"
            continue
        problems = _envelope_problems(envelope, receipt)
        bundle = envelope.get("bundle") if isinstance(envelope, dict) else None
        if isinstance(envelope, dict):
            row["received_at"] = _timestamp(envelope.get("received_at"))
            client = envelope.get("client")
            row["client_hash"] = client if isinstance(client, str) and re.fullmatch(r"[0-9a-f]{32}", client) else None
        row.update({
            "content_hash": _cut(_get(bundle, "content_hash"), 80),
            "method_name": _cut(_get(bundle, "method", "name"), 200),
            "method_version": _cut(_get(bundle, "method", "version"), 100),
            "description": _cut(_get(bundle, "method", "description"), 2000),
            "link": _cut(_get(bundle, "method", "link"), 300),
            "platform_version": _cut(_get(bundle, "platform", "version"), 100),
            "platform_commit": _cut(_get(bundle, "platform", "commit"), 100),
        })
        slides = _get(bundle, "slides")
        if isinstance(slides, list):
            ids = [s.get("slide_id") for s in slides if isinstance(s, dict)]
            row["n_slides"] = len(slides)
            row["slide_ids"] = ",".join(str(i)[:128] for i in ids)[:2000]
        if problems:
            row["reason"] = _join(problems)
            continue
        try:
            check_bundle(bundle)
        except Refusal as refusal:
            row["reason"] = _join(refusal.problems)
            continue
        digest = bundle["content_hash"]
        if digest in first_by_hash:
            row["duplicate_of"] = first_by_hash[digest]
            row["reason"] = f"duplicate: the same content ({digest}) as submission {first_by_hash[digest]}"
            continue
        first_by_hash[digest] = receipt
        platform = {s["slide_id"]: lookup(s["slide_id"]) for s in bundle["slides"]}
        problems = [p for s in bundle["slides"] for p in slide_problems(s["slide_id"], s["labels"],
                                                                           platform[s["slide_id"]], known_slides)]
        if problems:
            row["reason"] = _join(problems)
            continue
        for slide in bundle["slides"]:
            claimed = slide.get("claimed_scores") or {}
            result.scores.append({"submission_id": receipt, **score_slide(slide["labels"], platform[slide["slide_id"]]),
                                  "claimed_ari": claimed.get("ari"), "claimed_nmi": claimed.get("nmi")})
        row["status"] = "accepted"
    return result

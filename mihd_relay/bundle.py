"""The submission bundle: its JSON Schema (``schemas/submission-bundle-1.schema.json``), its
content hash, strict JSON parsing, and every check that needs no platform data.

The relay runs these checks on what it receives, the ingest asset runs them again on what
it reads from the queue (a queue file is input too), then checks the labels against the
slides the platform holds and re-scores them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "schemas" / "submission-bundle-1.schema.json"
SCHEMA_VERSION = 1
HASH_PREFIX = "sha256:"
# More distinct labels than this on one slide is not a clustering of a few layers.
MAX_DISTINCT_LABELS = 64
MAX_PROBLEMS = 20  # problems listed in one refusal; the count of the rest follows
# The relay's default body limit: a DLPFC slide of ~4,000 spots is ~150 kB of labels, all 12 about 2 MB.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Validators whose failure the schema's own `x-reason` explains better than jsonschema's message.
_REASONED = {"pattern", "not", "minLength", "maxLength", "const", "type", "minimum", "maximum", "minProperties",
             "maxProperties", "minItems", "maxItems", "enum"}


@dataclass
class Refusal(Exception):
    """Why a bundle is refused. ``kind``: ``invalid_json`` (not strict JSON), ``schema`` (does
    not follow the schema) or ``content`` (follows it, but its content is refused)."""

    kind: str
    reason: str
    problems: list[str] = field(default_factory=list)

    def __post_init__(self):
        super().__init__(self.reason)
        if not self.problems:
            self.problems = [self.reason]


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def schema() -> dict:
    """A copy of the bundle schema (callers may change it)."""
    return copy.deepcopy(load_schema())


@functools.lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(load_schema())
    return Draft202012Validator(load_schema())


def inlined_schema() -> dict:
    """The schema with every ``#/$defs/...`` reference replaced by its definition and without
    ``$schema``/``$id``/``$defs``: a self-contained copy that can sit inside another document
    (the relay's OpenAPI description)."""
    source = load_schema()
    defs = source.get("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                merged = {**resolve(defs[ref.removeprefix("#/$defs/")]), **{k: resolve(v) for k, v in node.items()
                                                                               if k != "$ref"}}
                return merged
            return {k: resolve(v) for k, v in node.items() if k not in ("$schema", "$id", "$defs")}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(source)


# --------------------------------------------------------------------------- strict JSON

def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON (a label or score must be a real value)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key[:80]!r} appears twice in one object")
        result[key] = value
    return result


def parse_json(data: bytes) -> Any:
    """``data`` as strict JSON: UTF-8, no NaN or Infinity, no number out of range, no key twice
    in one object; :class:`Refusal` (``invalid_json``) saying why otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal("invalid_json", f"invalid JSON: the body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise Refusal("invalid_json", f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # a constant, a number, a repeated key, an integer of too many digits
        raise Refusal("invalid_json", f"invalid JSON: {exc}") from None
    except RecursionError:
        raise Refusal("invalid_json", "invalid JSON: nested too deeply") from None


# --------------------------------------------------------------------------- hash

def canonical_bytes(bundle: dict) -> bytes:
    """The bytes the content hash covers: the bundle without ``content_hash``, UTF-8 JSON with
    sorted keys and no spaces."""
    body = {k: v for k, v in bundle.items() if k != "content_hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def content_hash(bundle: dict) -> str:
    return HASH_PREFIX + hashlib.sha256(canonical_bytes(bundle)).hexdigest()


def with_hash(bundle: dict) -> dict:
    """``bundle`` with its ``content_hash`` set (last, so it reads after the content)."""
    body = {k: v for k, v in bundle.items() if k != "content_hash"}
    return {**body, "content_hash": content_hash(body)}


# --------------------------------------------------------------------------- checks

def _location(path) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def schema_problems(obj: Any) -> list[str]:
    """Every way ``obj`` breaks the schema, as ``<location>: <why>``, sorted by location."""
    problems = []
    for error in sorted(_validator().iter_errors(obj), key=lambda e: (_location(e.absolute_path), e.validator)):
        reason = error.schema.get("x-reason") if isinstance(error.schema, dict) else None
        where = _location(error.absolute_path)
        if reason and error.validator in _REASONED:
            problems.append(f"{where}: {reason} (got {_shown(error.instance)})")
        else:
            problems.append(f"{where}: {error.message[:300]}")
    return problems


def content_problems(bundle: dict) -> list[str]:
    """Checks on a bundle that follows the schema: each slide once, a plausible number of
    distinct labels, and a content hash that matches the content."""
    problems = []
    seen: set[str] = set()
    for i, slide in enumerate(bundle["slides"]):
        slide_id = slide["slide_id"]
        if slide_id in seen:
            problems.append(f"$.slides[{i}].slide_id: slide {slide_id!r} appears more than once")
        seen.add(slide_id)
        distinct = len(set(slide["labels"].values()))
        if distinct > MAX_DISTINCT_LABELS:
            problems.append(f"$.slides[{i}].labels: {distinct} distinct labels on slide {slide_id!r}; at most "
                            f"{MAX_DISTINCT_LABELS} are accepted (one cluster label per spot)")
    computed = content_hash(bundle)
    if bundle["content_hash"] != computed:
        problems.append(f"$.content_hash: {bundle['content_hash']} does not match the content ({computed}): the bundle "
                        "changed after it was hashed, or was hashed another way (see the schema's description)")
    return problems


def _refusal(kind: str, problems: list[str]) -> Refusal:
    shown = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS} more")
    summary = problems[0] if len(problems) == 1 else f"{len(problems)} problems; first: {problems[0]}"
    return Refusal(kind, summary, shown)


def check_bundle(obj: Any) -> dict:
    """``obj`` if it is a valid bundle; :class:`Refusal` (``schema`` or ``content``) otherwise."""
    problems = schema_problems(obj)
    if problems:
        raise _refusal("schema", problems)
    problems = content_problems(obj)
    if problems:
        raise _refusal("content", problems)
    return obj


def parse_bundle(data: bytes) -> dict:
    """Strict JSON, then :func:`check_bundle`."""
    return check_bundle(parse_json(data))


def build_bundle(*, name: str, version: str, description: str, link: str, labels: dict[str, dict[str, str]],
                 software: dict, platform: dict, claimed_scores: dict[str, dict] | None = None) -> dict:
    """A checked bundle from its parts; ``labels`` maps slide id -> {barcode: label}."""
    slides = []
    for slide_id in sorted(labels):
        slide = {"slide_id": slide_id, "labels": dict(labels[slide_id])}
        if claimed_scores and slide_id in claimed_scores:
            slide["claimed_scores"] = dict(claimed_scores[slide_id])
        slides.append(slide)
    bundle = with_hash({
        "schema_version": SCHEMA_VERSION,
        "method": {"name": name, "version": version, "description": description, "link": link},
        "slides": slides,
        "software": software,
        "platform": platform,
    })
    return check_bundle(bundle)


def encode(bundle: dict) -> bytes:
    """The bytes sent: compact UTF-8 JSON (any key order; the hash does not depend on it)."""
    return json.dumps(bundle, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")

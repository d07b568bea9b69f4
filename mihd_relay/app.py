"""The relay: a FastAPI app, run by uvicorn (``mihd relay``), that accepts submission bundles
and queues them for the platform's ingest.

What it does with a request to ``POST /v1/submissions``, in order: counts it against the
client's rate limit (429 past the limit); refuses anything but ``application/json`` (415) and
any body over the size limit, by its Content-Length or while reading it (413); parses the body
as strict JSON (400) and checks it against the bundle schema and its content hash (422); answers
a bundle whose content it queued before with 409 and the first receipt id; writes a new one
atomically into the queue folder and answers 202 with its receipt id.

It holds no credentials (nothing here can write to the site or the repository), keeps the
client address only as a salted HMAC-SHA256, answers JSON only, and never executes or renders
anything it receives: it parses, checks and stores the bundle as data.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from .bundle import DEFAULT_MAX_BODY_BYTES, SCHEMA_VERSION, Refusal, inlined_schema, load_schema, parse_bundle
from .queue import QueueFull, SubmissionQueue

RELAY_VERSION = "1"
log = logging.getLogger("mihd.relay")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class RelaySettings:
    queue_dir: Path
    salt: bytes
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    rate_limit: int = 10             # POSTs per client ...
    rate_window_s: float = 60.0      # ... per this many seconds
    max_queued: int = 10_000
    body_timeout_s: float = 30.0

    def __post_init__(self):
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes {self.max_body_bytes} is below 1024")
        if self.rate_limit < 1 or self.rate_window_s <= 0:
            raise ValueError(f"rate limit {self.rate_limit} per {self.rate_window_s} s: both must be positive")
        if len(self.salt) < 16:
            raise ValueError("the salt must be at least 16 bytes")


def load_or_create_salt(path: str | os.PathLike) -> bytes:
    """The salt in ``path``; made once (32 random bytes, mode 0600) when the file is absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        salt = bytes.fromhex(path.read_text().strip())
        if len(salt) < 16:
            raise ValueError(f"{path}: the salt is {len(salt)} bytes; remove the file to make a new one") from None
        return salt
    salt = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(salt.hex() + "\n")
    return salt


def client_hash(salt: bytes, address: str) -> str:
    return hmac.new(salt, address.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:32]


class RateLimiter:
    """At most ``limit`` hits per client in any ``window_s`` seconds (a sliding log per client;
    the least recently seen clients are forgotten past ``max_clients``)."""

    def __init__(self, limit: int, window_s: float, max_clients: int = 100_000):
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self._hits: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._lock = threading.Lock()

    def hit(self, client: str, now: float | None = None) -> float | None:
        """Record a hit; None when allowed, else the seconds until the next one is."""
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits.pop(client, None) or collections.deque(maxlen=self.limit)
            self._hits[client] = hits
            while len(self._hits) > self.max_clients:
                self._hits.popitem(last=False)
            if len(hits) == self.limit and now - hits[0] < self.window_s:
                return self.window_s - (now - hits[0])
            hits.append(now)
            return None


class Receipt(BaseModel):
    status: Literal["queued"]
    receipt_id: str
    content_hash: str
    received_at: str


class Refused(BaseModel):
    status: Literal["refused"]
    kind: str
    reason: str
    problems: list[str]


class Duplicate(BaseModel):
    status: Literal["duplicate"]
    reason: str
    receipt_id: str
    content_hash: str


class Health(BaseModel):
    status: Literal["ok"]
    schema_version: int
    relay_version: str


def _refused(status: int, kind: str, reason: str, problems: list[str] | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    body = Refused(status="refused", kind=kind, reason=reason, problems=problems or [reason])
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


async def _read_limited(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _refusal_doc(description: str) -> dict:
    return {"model": Refused, "description": description}


def create_app(settings: RelaySettings) -> FastAPI:
    app = FastAPI(
        title="MIHD leaderboard relay",
        version=RELAY_VERSION,
        description="Accepts leaderboard submission bundles, checks them against the bundle schema and queues "
        "them for the platform's ingest, which re-scores them. Holds no credentials.",
        docs_url=None, redoc_url=None,  # the interactive pages would load scripts from elsewhere
        openapi_url="/openapi.json",
    )
    limiter = RateLimiter(settings.rate_limit, settings.rate_window_s)
    queue = SubmissionQueue(settings.queue_dir, settings.max_queued)
    limit_text = f"{settings.max_body_bytes} bytes"

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers[name] = value
        # The access log names the client by its salted hash only (uvicorn's own log is off).
        address = request.client.host if request.client else "unknown"
        log.info("%s %s %s client %s", request.method, request.url.path[:200], response.status_code,
                 client_hash(settings.salt, address))
        return response

    @app.get("/v1/health", response_model=Health, summary="The relay is up")
    def health() -> Health:
        return Health(status="ok", schema_version=SCHEMA_VERSION, relay_version=RELAY_VERSION)

    @app.get("/v1/schema", summary="The JSON Schema a bundle must follow")
    def bundle_schema() -> dict:
        return load_schema()

    @app.post(
        "/v1/submissions",
        status_code=202,
        response_model=Receipt,
        summary="Queue a submission bundle",
        description=f"The body is one submission bundle (at most {limit_text}). At most {settings.rate_limit} "
        f"submissions per client per {settings.rate_window_s:g} s.",
        openapi_extra={"requestBody": {"required": True,
                                       "content": {"application/json": {"schema": inlined_schema()}}}},
        responses={
            400: _refusal_doc("the body is not strict JSON, or the client left before sending all of it"),
            408: _refusal_doc("the body did not arrive in time"),
            409: {"model": Duplicate, "description": "the same content was queued before"},
            413: _refusal_doc(f"the body is over {limit_text}"),
            415: _refusal_doc("the body is not application/json"),
            422: _refusal_doc("the bundle breaks the schema, or its content hash does not match"),
            429: _refusal_doc("too many submissions from this client; see Retry-After"),
            503: _refusal_doc("the queue is full; see Retry-After"),
        },
    )
    async def submit(request: Request):
        address = request.client.host if request.client else "unknown"
        client = client_hash(settings.salt, address)
        wait = limiter.hit(client)
        if wait is not None:
            return _refused(429, "rate_limited",
                            f"rate limit: at most {settings.rate_limit} submissions per {settings.rate_window_s:g} s "
                            f"from one client; retry in {math.ceil(wait)} s",
                            headers={"Retry-After": str(math.ceil(wait))})
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return _refused(415, "unsupported_media_type",
                            f"the body must be application/json, not {media[:60] or 'missing'!r}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            return _refused(413, "too_large", f"the body is {int(declared)} bytes; the limit is {limit_text}")
        try:
            body = await asyncio.wait_for(_read_limited(request, settings.max_body_bytes), settings.body_timeout_s)
        except _TooLarge:
            return _refused(413, "too_large", f"the body is over the limit of {limit_text}")
        except asyncio.TimeoutError:
            return _refused(408, "timeout", f"the body did not arrive within {settings.body_timeout_s:g} s")
        except ClientDisconnect:
            return _refused(400, "disconnected", "the client closed the connection before the body was complete")
        try:
            bundle = await asyncio.to_thread(parse_bundle, body)
        except Refusal as refusal:
            status = 400 if refusal.kind == "invalid_json" else 422
            return _refused(status, refusal.kind, refusal.reason, refusal.problems)
        try:
            receipt, duplicate_of, received_at = await asyncio.to_thread(queue.receive, bundle, client)
        except QueueFull as exc:
            return _refused(503, "queue_full", f"{exc}; try again later", headers={"Retry-After": "3600"})
        if duplicate_of is not None:
            body = Duplicate(status="duplicate", receipt_id=duplicate_of, content_hash=bundle["content_hash"],
                             reason=f"the same content ({bundle['content_hash']}) was queued before as {duplicate_of}")
            return JSONResponse(body.model_dump(), status_code=409)
        return JSONResponse(Receipt(status="queued", receipt_id=receipt, content_hash=bundle["content_hash"],
                                    received_at=received_at).model_dump(), status_code=202)

    return app

"""``mihd relay``: the relay app under uvicorn, one process, one worker (the rate limit is per process)."""

from __future__ import annotations

from pathlib import Path

from .app import DEFAULT_MAX_BODY_BYTES, RelaySettings, create_app, load_or_create_salt


def serve(*, host: str, port: int, queue: Path, salt_file: Path, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          rate_limit: int = 10, rate_window_s: float = 60.0, max_queued: int = 10_000,
          forwarded_allow_ips: str | None = None, log_level: str = "info") -> None:
    """Run until stopped (SIGINT / SIGTERM). Client addresses are the TCP peer's unless
    ``forwarded_allow_ips`` names the reverse proxies whose X-Forwarded-For is believed."""
    import logging

    import uvicorn

    settings = RelaySettings(queue_dir=queue, salt=load_or_create_salt(salt_file), max_body_bytes=max_body_bytes,
                             rate_limit=rate_limit, rate_window_s=rate_window_s, max_queued=max_queued)
    app = create_app(settings)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"mihd relay: http://{host}:{port}/v1/submissions -> queue {queue} (body limit {max_body_bytes} bytes, "
          f"{rate_limit} submissions per {rate_window_s:g} s per client)", flush=True)
    uvicorn.run(
        app, host=host, port=port, workers=1,
        proxy_headers=forwarded_allow_ips is not None,
        forwarded_allow_ips=forwarded_allow_ips,
        server_header=False,
        limit_concurrency=64,            # more connections at once get 503 from uvicorn
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers
        log_level=log_level,
        access_log=False,  # it would log client addresses; the app logs their salted hash instead
    )

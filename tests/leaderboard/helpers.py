"""Shared pieces of the leaderboard tests: bundles, platform slides, a relay process on loopback."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from mihd_assets.leaderboard.ingest import PlatformSlide
from mihd_relay.bundle import build_bundle, encode, with_hash
from tests.conftest import BASE_ENV, REPO
from tests.services.dagster_services import stop_group, tail

SOFTWARE = {"python": "3.11.7", "packages": {"numpy": "1.26.4"}}
PLATFORM = {"name": "mihd-platform", "version": "0.1.0", "commit": "0123456789abcdef0123456789abcdef01234567"}
RELAY_STARTUP_S = 90


def platform_slide(slide_id: str = "s1", n: int = 120, layers: int = 4, seed: int = 0,
                   with_truth: bool = True) -> PlatformSlide:
    """A slide of ``n`` spots on a grid whose truth is ``layers`` horizontal bands."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    xy = np.asarray([(i % side, i // side) for i in range(n)], dtype=np.float64) * 100.0
    band = np.minimum((xy[:, 1] / (xy[:, 1].max() + 1) * layers).astype(int), layers - 1)
    truth = np.asarray([f"L{b + 1}" if with_truth else None for b in band], dtype=object)
    if with_truth:
        truth[rng.choice(n, size=max(1, n // 20), replace=False)] = None  # a few unlabelled spots
    barcodes = [f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(n)]
    return PlatformSlide(slide_id, barcodes, truth, xy)


def noisy_labels(slide: PlatformSlide, flip: float, seed: int = 1) -> dict[str, str]:
    """Labels that follow the bands, with a fraction ``flip`` of spots given a random other band."""
    rng = np.random.default_rng(seed)
    side_y = slide.coords[:, 1]
    layers = max(slide.n_layers, 2)
    band = np.minimum((side_y / (side_y.max() + 1) * layers).astype(int), layers - 1)
    flipped = rng.random(len(band)) < flip
    band[flipped] = rng.integers(0, layers, size=int(flipped.sum()))
    return {b: f"c{int(v)}" for b, v in zip(slide.barcodes, band)}


def make_bundle(labels: dict[str, dict[str, str]], name: str = "BandFinder", version: str = "1.0",
                claimed: dict | None = None, description: str = "Finds the bands.",
                link: str = "https://example.org/bandfinder") -> dict:
    return build_bundle(name=name, version=version, description=description, link=link, labels=labels,
                        software=SOFTWARE, platform=PLATFORM, claimed_scores=claimed)


def rehash(bundle: dict) -> dict:
    """``bundle`` (changed by a test) with a content hash that matches it again."""
    return with_hash(bundle)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """`mihd relay` on 127.0.0.1 in its own process group; :meth:`stop` ends the group."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None):
        tmp.mkdir(parents=True, exist_ok=True)
        self.queue = tmp / "queue"
        self.salt = tmp / "salt"
        self.log = tmp / "relay.log"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "dagster_project.cli", "relay", "--host", "127.0.0.1", "--port",
                   str(self.port), "--queue", str(self.queue), "--salt-file", str(self.salt), *args]
        with self.log.open("w") as fh:
            self.proc = subprocess.Popen(command, cwd=REPO, env={**BASE_ENV, **(env or {})}, stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _wait(self) -> None:
        deadline = time.monotonic() + RELAY_STARTUP_S
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mihd relay exited with {self.proc.returncode}:\n{tail(self.log)}")
            try:
                with urllib.request.urlopen(f"{self.base}/v1/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise RuntimeError(f"mihd relay did not answer within {RELAY_STARTUP_S} s ({last}):\n{tail(self.log)}")

    def post(self, body: bytes | dict, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> tuple[int, dict, "http.client.HTTPMessage"]:
        """(status, JSON answer, response headers: case-insensitive) of one POST /v1/submissions."""
        data = encode(body) if isinstance(body, dict) else body
        request = urllib.request.Request(f"{self.base}/v1/submissions", data=data, method="POST",
                                         headers={"Content-Type": content_type, **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status, json.loads(resp.read()), resp.headers
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read()), exc.headers

    def queued(self) -> list[Path]:
        return sorted(self.queue.glob("*.json"))

    def stop(self) -> None:
        stop_group(self.proc)

    def running(self) -> bool:
        return self.proc.poll() is None

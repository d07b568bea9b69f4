"""The client side of a submission (``mihd submit``): labels files in, a checked bundle out,
shown in full before anything is sent, and sent only with consent.

Consent: ``upload=True`` (``--upload``) sends, ``upload=False`` (``--no-upload``) never does;
without either the user is asked on the terminal, and with no terminal nothing is sent.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform as _platform
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import TextIO

from .bundle import REPO_ROOT, encode

RELAY_URL_ENV = "MIHD_RELAY_URL"
SUBMISSIONS_PATH = "/v1/submissions"
# Versions recorded in every bundle (those installed); more with --package.
DEFAULT_PACKAGES = ("mihd-platform", "numpy", "scipy", "pandas", "scikit-learn", "scanpy", "anndata", "torch",
                    "timm", "leidenalg", "rpy2")
MAX_LABELS_FILE_BYTES = 64 * 1024 * 1024
PREVIEW_SPOTS = 5


class SubmitError(RuntimeError):
    """The bundle cannot be made or sent; the message says why."""


def read_labels_file(path: str | os.PathLike) -> dict[str, str]:
    """``barcode,label`` per line (CSV, or TSV when the first line has a tab); a first line
    ``barcode,label`` (any case) is a header. A barcode twice is an error."""
    path = Path(path)
    if not path.is_file():
        raise SubmitError(f"labels file {path}: not a file")
    if path.stat().st_size > MAX_LABELS_FILE_BYTES:
        raise SubmitError(f"labels file {path}: over {MAX_LABELS_FILE_BYTES} bytes")
    text = path.read_text(encoding="utf-8")
    first = text.split("\n", 1)[0]
    reader = csv.reader(io.StringIO(text), delimiter="\t" if "\t" in first else ",")
    labels: dict[str, str] = {}
    for number, row in enumerate(reader, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise SubmitError(f"labels file {path}, line {number}: {len(row)} columns; two are expected (barcode, label)")
        barcode, label = row[0].strip(), row[1].strip()
        if number == 1 and barcode.lower() == "barcode" and label.lower() == "label":
            continue
        if barcode in labels:
            raise SubmitError(f"labels file {path}, line {number}: barcode {barcode!r} appears twice")
        labels[barcode] = label
    if not labels:
        raise SubmitError(f"labels file {path}: no labels")
    return labels


def software_versions(extra: list[str] | tuple[str, ...] = ()) -> dict:
    packages = {}
    for name in (*DEFAULT_PACKAGES, *extra):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in extra:
                raise SubmitError(f"--package {name}: not installed in this environment") from None
    return {"python": _platform.python_version(), "packages": packages}


def platform_info() -> dict:
    """The platform's name, package version and git commit (``-dirty`` with uncommitted changes;
    null when the code is not a git checkout or git is not installed)."""
    try:
        version = metadata.version("mihd-platform")
    except metadata.PackageNotFoundError:
        raise SubmitError("the mihd-platform package is not installed (pip install -e .)") from None
    commit = None
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30)
        if head.returncode == 0:
            commit = head.stdout.strip()
            status = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=60)
            if status.returncode == 0 and status.stdout.strip():
                commit += "-dirty"
    except FileNotFoundError:  # no git executable: the commit is unknown, and the bundle says null
        commit = None
    return {"name": "mihd-platform", "version": version, "commit": commit}


def endpoint(url: str) -> str:
    """The submissions endpoint of a relay URL (``http(s)://host[:port][/prefix]``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SubmitError(f"relay URL {url!r}: an http:// or https:// URL is expected")
    if parts.query or parts.fragment:
        raise SubmitError(f"relay URL {url!r}: no query or fragment, please")
    path = parts.path.rstrip("/")
    if not path.endswith(SUBMISSIONS_PATH):
        path += SUBMISSIONS_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def relay_url(option: str | None) -> str | None:
    return option or os.environ.get(RELAY_URL_ENV) or None


def preview(bundle: dict, body: bytes, destination: str | None, body_file: Path | None) -> str:
    """What will be sent, for the user to read: every member of the bundle, each slide's
    spot count and first labels, the size and hash of the exact body, and where it goes."""
    shown = dict(bundle)
    shown["slides"] = []
    for slide in bundle["slides"]:
        labels = slide["labels"]
        first = dict(list(labels.items())[:PREVIEW_SPOTS])
        entry = {"slide_id": slide["slide_id"],
                 "labels": {**first, **({"...": f"{len(labels) - len(first)} more spots"} if len(labels) > len(first)
                                        else {})}}
        if "claimed_scores" in slide:
            entry["claimed_scores"] = slide["claimed_scores"]
        shown["slides"].append(entry)
    lines = ["This is the submission bundle:", json.dumps(shown, indent=2, ensure_ascii=False), ""]
    for slide in bundle["slides"]:
        lines.append(f"  slide {slide['slide_id']}: {len(slide['labels'])} spots, "
                     f"{len(set(slide['labels'].values()))} distinct labels")
    lines.append(f"  body: {len(body)} bytes of JSON, content hash {bundle['content_hash']}")
    if body_file is not None:
        lines.append(f"  the exact bytes are in {body_file}")
    if destination:
        lines.append(f"  destination: POST {destination}")
        lines.append("  The relay keeps your network address only as a salted hash (for its rate limit); the "
                     "platform re-scores the labels itself.")
    return "\n".join(lines)


def consent(upload: bool | None, stdin: TextIO, stdout: TextIO, destination: str) -> tuple[bool, str]:
    """(send?, why): the flag when given; else the user's answer on the terminal; else no."""
    if upload is True:
        return True, "--upload given"
    if upload is False:
        return False, "--no-upload given"
    if not stdin.isatty():
        return False, ("standard input is not a terminal, so nobody could be asked; nothing was sent (pass --upload "
                       "to send without asking)")
    stdout.write(f"Send this bundle to {destination}? [y/N] ")
    stdout.flush()
    answer = stdin.readline().strip().lower()
    if answer in ("y", "yes"):
        return True, "confirmed on the terminal"
    return False, "not confirmed; nothing was sent"


def upload_bundle(destination: str, body: bytes, timeout_s: float = 60.0) -> tuple[int, dict]:
    """POST the body; (HTTP status, the relay's JSON answer)."""
    request = urllib.request.Request(destination, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json",
                                              "User-Agent": "mihd-submit/1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, raw = response.status, response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read(1 << 20)
    except (urllib.error.URLError, OSError) as exc:
        raise SubmitError(f"could not reach the relay at {destination}: {getattr(exc, 'reason', exc)}") from None
    try:
        answer = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        answer = {"status": "unreadable", "reason": raw[:300].decode("utf-8", "replace")}
    if not isinstance(answer, dict):
        answer = {"status": "unreadable", "reason": str(answer)[:300]}
    return status, answer


def describe_answer(status: int, answer: dict) -> tuple[bool, str]:
    """(queued?, a line for the user) from the relay's answer."""
    if status == 202 and answer.get("status") == "queued":
        return True, (f"queued: receipt id {answer.get('receipt_id')} (content hash {answer.get('content_hash')}). "
                      "The platform checks and re-scores it at its next ingest.")
    if status == 409:
        return False, f"duplicate: {answer.get('reason')}"
    problems = answer.get("problems") or []
    extra = "".join(f"\n  - {p}" for p in problems[:20] if p != answer.get("reason"))
    return False, f"refused by the relay (HTTP {status}): {answer.get('reason')}{extra}"


def write_bundle(path: str | os.PathLike, body: bytes) -> Path:
    from mihd_assets.fileio import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, body)
    return path


def submit(bundle: dict, *, relay: str | None, upload: bool | None, out: str | None,
           stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Show the bundle, then write it (``out``) or send it with consent; the exit code."""
    body = encode(bundle)
    if out is not None:
        path = write_bundle(out, body)
        stdout.write(preview(bundle, body, None, path) + "\n")
        stdout.write(f"written to {path}; nothing was sent\n")
        return 0
    destination = endpoint(relay) if relay else None
    if destination is None and upload is not False:
        raise SubmitError(f"no relay URL: pass --relay URL or set {RELAY_URL_ENV} (or --out FILE to keep the bundle)")
    stdout.write(preview(bundle, body, destination, None) + "\n")
    if destination is None:
        stdout.write("not sent: --no-upload given\n")
        return 0
    send, why = consent(upload, stdin, stdout, destination)
    if not send:
        stdout.write(f"not sent: {why}\n")
        return 0 if upload is False or stdin.isatty() else 3
    status, answer = upload_bundle(destination, body)
    queued, line = describe_answer(status, answer)
    stdout.write(line + "\n")
    return 0 if queued else 1

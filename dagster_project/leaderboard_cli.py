"""`mihd submit` and `mihd relay`: the leaderboard's two commands (added to `mihd` by cli.py).

    mihd relay                       run the relay (uvicorn) on 127.0.0.1:8765, queueing into $MIHD_HOME/relay/queue
    mihd submit --name N --version V --description D --link URL --labels SLIDE=FILE ... [--relay URL]
    mihd submit ... --from-platform gene_pca__mclust --out bundle.json
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mihd_relay import client, paths
from mihd_relay.bundle import DEFAULT_MAX_BODY_BYTES, Refusal, build_bundle

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


def _labels_from_files(specs: list[str]) -> dict[str, dict[str, str]]:
    labels = {}
    for spec in specs:
        slide, sep, path = spec.partition("=")
        if not sep or not slide or not path:
            raise client.SubmitError(f"--labels {spec!r}: SLIDE=FILE expected")
        if slide in labels:
            raise client.SubmitError(f"--labels: slide {slide!r} given twice")
        labels[slide] = client.read_labels_file(path)
    return labels


def _labels_from_platform(clustering: str, slides: list[str] | None) -> dict[str, dict[str, str]]:
    """The refined labels the platform stored for ``clustering/<clustering>``, per slide."""
    from mihd_assets.fusion.store import SpotLabels
    from mihd_resources import settings

    if not _NAME.fullmatch(clustering) or ".." in clustering:
        raise client.SubmitError(f"--from-platform {clustering!r}: a clustering asset name such as gene_pca__mclust")
    folder = settings.storage_root() / "clustering" / clustering
    stored = {p.stem: p for p in sorted(folder.glob("*.npz"))} if folder.is_dir() else {}
    if not stored:
        raise client.SubmitError(f"--from-platform {clustering}: no stored labels in {folder}; materialize "
                                 f"clustering/{clustering} first")
    wanted = slides or sorted(stored)
    absent = [s for s in wanted if s not in stored]
    if absent:
        raise client.SubmitError(f"--from-platform {clustering}: no stored labels for slide(s) {absent} in {folder}")
    out = {}
    for slide in wanted:
        labels = SpotLabels.load(stored[slide])
        out[slide] = {b: str(int(v)) for b, v in zip(labels.obs_names, labels.refined)}
    return out


def cmd_submit(args) -> int:
    if args.out and args.upload:
        print("mihd submit: --out writes the bundle without sending it; drop --upload (or --out)", file=sys.stderr)
        return 2
    try:
        labels = (_labels_from_files(args.labels) if args.labels
                  else _labels_from_platform(args.from_platform, args.slide))
        bundle = build_bundle(name=args.name, version=args.method_version, description=args.description,
                              link=args.link, labels=labels, software=client.software_versions(args.package),
                              platform=client.platform_info())
        return client.submit(bundle, relay=client.relay_url(args.relay), upload=args.upload, out=args.out)
    except Refusal as refusal:
        problems = "".join(f"\n  - {p}" for p in refusal.problems)
        print(f"mihd submit: the bundle would be refused: {refusal.reason}{problems}", file=sys.stderr)
        return 1
    except client.SubmitError as exc:
        print(f"mihd submit: {exc}", file=sys.stderr)
        return 1


def cmd_relay(args) -> int:
    from mihd_relay.server import serve

    serve(host=args.host, port=args.port, queue=Path(args.queue or paths.queue_dir()).resolve(),
          salt_file=Path(args.salt_file or paths.salt_file()).resolve(), max_body_bytes=args.max_body_bytes,
          rate_limit=args.rate_limit, rate_window_s=args.rate_window, max_queued=args.max_queued,
          forwarded_allow_ips=args.forwarded_allow_ips, log_level=args.log_level)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("submit", help="package labels as a leaderboard submission bundle, show it, send it only "
                                      "with consent")
    p.add_argument("--name", required=True, help="method name (letters, digits, spaces, . _ + ( ) -)")
    p.add_argument("--version", required=True, dest="method_version", help="method version, e.g. 1.2.0")
    p.add_argument("--description", required=True, help="plain text, up to 2000 characters")
    p.add_argument("--link", required=True, help="https:// URL of the method (paper, code)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", action="append", metavar="SLIDE=FILE",
                        help="per-spot labels of one slide: CSV or TSV, barcode,label (repeat per slide)")
    source.add_argument("--from-platform", metavar="CLUSTERING",
                        help="the platform's own stored refined labels of clustering/CLUSTERING (e.g. gene_pca__mclust)")
    p.add_argument("--slide", action="append", help="with --from-platform: only this slide (repeatable)")
    p.add_argument("--package", action="append", default=[], metavar="NAME",
                   help="also record this installed package's version (repeatable)")
    p.add_argument("--relay", metavar="URL", help=f"the relay, e.g. http://127.0.0.1:8765 (default ${client.RELAY_URL_ENV})")
    p.add_argument("--upload", action=argparse.BooleanOptionalAction, default=None,
                   help="--upload sends without asking; --no-upload never sends; without either you are asked on "
                        "the terminal, and with no terminal nothing is sent (exit code 3)")
    p.add_argument("--out", metavar="FILE", help="write the bundle to FILE and send nothing")
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("relay", help="run the submission relay (uvicorn): validates bundles and queues them for ingest")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--queue", help="queue folder (default $MIHD_RELAY_QUEUE, else $MIHD_HOME/relay/queue)")
    p.add_argument("--salt-file", help="salt for client address hashes (default $MIHD_RELAY_SALT_FILE, else "
                                       "$MIHD_HOME/relay/salt; made once, mode 0600)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--rate-limit", type=int, default=10, help="submissions per client per --rate-window (default 10)")
    p.add_argument("--rate-window", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument("--max-queued", type=int, default=10_000, help="refuse with 503 once the queue holds this many")
    p.add_argument("--forwarded-allow-ips", metavar="IPS",
                   help="behind a reverse proxy: the proxies whose X-Forwarded-For names the client (default: none; "
                        "the TCP peer is the client)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(fn=cmd_relay)

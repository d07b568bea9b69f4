"""`mihd submit`: the bundle is shown before anything is sent; on a terminal the user is asked
(only 'y' sends), `--no-upload` and `--out` never send, `--upload` sends without asking; the
relay URL comes from `--relay` or $MIHD_RELAY_URL; a bundle the relay would refuse is refused
before it is sent."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import numpy as np
import pytest

from mihd_relay.bundle import parse_bundle
from tests.conftest import BASE_ENV, REPO
from tests.leaderboard.helpers import Relay

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submit_relay")
    server = Relay(tmp, env={"MIHD_HOME": str(tmp)})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def labels_file(tmp_path):
    path = tmp_path / "s1.tsv"
    path.write_text("barcode\tlabel\n" + "".join(f"B{i:04d}-1\tc{i % 3}\n" for i in range(40)))
    return path


def _args(labels_file, name="Cli Method", *extra):
    return ["submit", "--name", name, "--version", "0.3", "--description", "From the command line.",
            "--link", "https://example.org/cli", "--labels", f"s1={labels_file}", *extra]


def _mihd(args, env, answer: bytes | None = None) -> subprocess.CompletedProcess:
    """Run `mihd`; with ``answer`` its standard input is a terminal (a pty) that already holds the answer."""
    full_env = {**BASE_ENV, **env}
    command = [sys.executable, "-m", "dagster_project.cli", *args]
    if answer is None:
        return subprocess.run(command, cwd=REPO, env=full_env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120)
    master, slave = pty.openpty()
    try:
        os.write(master, answer)
        return subprocess.run(command, cwd=REPO, env=full_env, stdin=slave, capture_output=True, text=True,
                              timeout=120)
    finally:
        os.close(slave)
        os.close(master)


def test_on_a_terminal_only_yes_sends(relay, labels_file, tmp_path):
    env = {"MIHD_HOME": str(tmp_path), "MIHD_RELAY_URL": relay.base}
    before = relay.queued()
    declined = _mihd(_args(labels_file), env, answer=b"n\n")
    assert declined.returncode == 0, declined.stdout + declined.stderr
    assert f"Send this bundle to {relay.base}/v1/submissions? [y/N]" in declined.stdout
    assert "not sent: not confirmed" in declined.stdout and relay.queued() == before
    # What is shown is the bundle itself: every member, the spot count, the body's size and hash.
    assert '"name": "Cli Method"' in declined.stdout and '"description": "From the command line."' in declined.stdout
    assert "slide s1: 40 spots, 3 distinct labels" in declined.stdout and "content hash sha256:" in declined.stdout
    confirmed = _mihd(_args(labels_file), env, answer=b"y\n")
    assert confirmed.returncode == 0 and "queued: receipt id" in confirmed.stdout, confirmed.stdout + confirmed.stderr
    assert len(relay.queued()) == len(before) + 1


def test_no_upload_and_out_never_send(relay, labels_file, tmp_path):
    env = {"MIHD_HOME": str(tmp_path)}
    before = relay.queued()
    no = _mihd(_args(labels_file, "Never Sent", "--relay", relay.base, "--no-upload"), env, answer=b"y\n")
    assert no.returncode == 0 and "not sent: --no-upload given" in no.stdout and "[y/N]" not in no.stdout
    out = tmp_path / "bundle.json"
    kept = _mihd(_args(labels_file, "Never Sent", "--out", str(out)), env)
    assert kept.returncode == 0 and f"written to {out}; nothing was sent" in kept.stdout, kept.stdout + kept.stderr
    bundle = parse_bundle(out.read_bytes())
    assert bundle["method"]["name"] == "Never Sent" and len(bundle["slides"][0]["labels"]) == 40
    assert bundle["platform"]["name"] == "mihd-platform" and bundle["software"]["packages"]["numpy"]
    both = _mihd(_args(labels_file, "Never Sent", "--out", str(out), "--upload"), env)
    assert both.returncode == 2 and "--out writes the bundle without sending it" in both.stderr
    assert relay.queued() == before


def test_upload_flag_sends_without_asking_and_relay_option_wins(relay, labels_file, tmp_path):
    env = {"MIHD_HOME": str(tmp_path), "MIHD_RELAY_URL": "http://127.0.0.1:9/nowhere"}
    sent = _mihd(_args(labels_file, "Flag Sent", "--relay", relay.base, "--upload"), env)
    assert sent.returncode == 0 and "queued: receipt id" in sent.stdout and "[y/N]" not in sent.stdout
    receipt = sent.stdout.split("queued: receipt id ")[1].split()[0]
    assert json.loads((relay.queue / f"{receipt}.json").read_text())["bundle"]["method"]["name"] == "Flag Sent"
    unreachable = _mihd(_args(labels_file, "Flag Sent 2", "--upload"), env)
    assert unreachable.returncode == 1 and "could not reach the relay at http://127.0.0.1:9/nowhere/v1/submissions" \
        in unreachable.stderr


def test_bad_bundles_and_files_are_refused_before_sending(relay, labels_file, tmp_path):
    env = {"MIHD_HOME": str(tmp_path), "MIHD_RELAY_URL": relay.base}
    before = relay.queued()
    html = _mihd(_args(labels_file, "<script>x</script>", "--upload"), env)
    assert html.returncode == 1 and "the bundle would be refused" in html.stderr and "no HTML" in html.stderr
    twice = tmp_path / "twice.csv"
    twice.write_text("B1-1,c1\nB1-1,c2\n")
    dup = _mihd(_args(twice, "Dup", "--upload"), env)
    assert dup.returncode == 1 and "barcode 'B1-1' appears twice" in dup.stderr
    no_relay = _mihd(_args(labels_file, "Nowhere", "--upload"), {"MIHD_HOME": str(tmp_path)})
    assert no_relay.returncode == 1 and "no relay URL: pass --relay URL or set MIHD_RELAY_URL" in no_relay.stderr
    assert relay.queued() == before


def test_from_platform_packages_the_stored_refined_labels(tmp_path):
    from mihd_assets.fusion.store import SpotLabels

    storage = tmp_path / "storage"
    stored = SpotLabels([f"B{i}-1" for i in range(30)], np.arange(30) % 4, (np.arange(30) // 8) % 4, {})
    stored.save(storage / "clustering" / "gene_pca__kmeans" / "demo_01.npz")
    out = tmp_path / "platform.json"
    result = _mihd(["submit", "--name", "Platform kmeans", "--version", "1", "--description", "The platform's own.",
                    "--link", "https://example.org/p", "--from-platform", "gene_pca__kmeans", "--out", str(out)],
                   {"MIHD_HOME": str(tmp_path), "MIHD_STORAGE": str(storage)})
    assert result.returncode == 0, result.stdout + result.stderr
    (slide,) = parse_bundle(out.read_bytes())["slides"]
    assert slide["slide_id"] == "demo_01"
    assert slide["labels"] == {b: str(v) for b, v in zip(stored.obs_names, stored.refined)}
    missing = _mihd(["submit", "--name", "x", "--version", "1", "--description", "d", "--link", "https://e.org",
                     "--from-platform", "../etc", "--out", str(out)], {"MIHD_HOME": str(tmp_path),
                                                                       "MIHD_STORAGE": str(storage)})
    assert missing.returncode == 1 and "a clustering asset name" in missing.stderr

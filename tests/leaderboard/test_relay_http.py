"""The relay over loopback HTTP: `mihd relay` (uvicorn) is started by the fixture in its own
process group on 127.0.0.1 and stopped by it. A valid bundle is accepted and queued, the same
bundle again is a duplicate, every bad input is refused with its reason (nothing queued), a
flood from one client gets 429; then, end to end, a bundle sent by `mihd submit` is ingested
through the queue sensor, re-scored against the platform's raw_slide and shown on the site."""

from __future__ import annotations

import csv
import http.client
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from mihd_relay.bundle import MAX_DISTINCT_LABELS, encode
from tests.conftest import BASE_ENV, REPO
from tests.leaderboard.helpers import Relay, make_bundle, rehash

pytestmark = pytest.mark.timeout(300)

LABELS = {"151673": {"AAACAAGTATCTCCCA-1": "L1", "AAACACCAATAACTGC-1": "L2", "AAACAGAGCGACTCCT-1": "L3"}}
BODY_LIMIT = 200_000


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relay")
    server = Relay(tmp, "--max-body-bytes", str(BODY_LIMIT), "--rate-limit", "1000", env={"MIHD_HOME": str(tmp)})
    try:
        yield server
    finally:
        server.stop()
    assert not server.running()


def test_health_and_openapi_describe_the_relay(relay):
    import urllib.request

    with urllib.request.urlopen(f"{relay.base}/v1/health") as resp:
        assert json.loads(resp.read()) == {"status": "ok", "schema_version": 1, "relay_version": "1"}
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    with urllib.request.urlopen(f"{relay.base}/openapi.json") as resp:
        spec = json.loads(resp.read())
    body = spec["paths"]["/v1/submissions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["schema_version", "method", "slides", "software", "platform", "content_hash"]
    assert {"202", "400", "409", "413", "415", "422", "429"} <= set(spec["paths"]["/v1/submissions"]["post"]["responses"])
    for path in ("/docs", "/redoc"):  # no interactive pages (they would load scripts from elsewhere)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{relay.base}{path}")
        assert info.value.code == 404


def test_valid_bundle_is_queued_and_the_same_again_is_a_duplicate(relay):
    before = relay.queued()
    bundle = make_bundle(LABELS, name="Queued once")
    status, answer, _ = relay.post(bundle)
    assert status == 202 and answer["status"] == "queued", answer
    receipt = answer["receipt_id"]
    assert answer["content_hash"] == bundle["content_hash"]
    (new,) = [p for p in relay.queued() if p not in before]
    assert new.name == f"{receipt}.json"
    envelope = json.loads(new.read_text())
    assert envelope["bundle"] == bundle and envelope["receipt_id"] == receipt
    assert len(envelope["client"]) == 32 and "127.0.0.1" not in new.read_text()  # the address only as a salted hash
    assert stat.S_IMODE(os.stat(relay.salt).st_mode) == 0o600
    status, answer, _ = relay.post(bundle)
    assert status == 409 and answer["status"] == "duplicate" and answer["receipt_id"] == receipt, answer
    assert f"was queued before as {receipt}" in answer["reason"]
    assert len(relay.queued()) == len(before) + 1
    # The relay's log names clients by the same salted hash, never by address.
    log = relay.log.read_text()
    assert f"POST /v1/submissions 202 client {envelope['client']}" in log
    assert f"POST /v1/submissions 409 client {envelope['client']}" in log
    assert not re.search(r"127\.0\.0\.1:\d+ - ", log), log[-2000:]


def _mutated(change):
    bundle = make_bundle(LABELS)
    change(bundle)
    return encode(rehash(bundle))


def _wrong_hash():
    bundle = make_bundle(LABELS)
    bundle["slides"][0]["labels"]["AAACAAGTATCTCCCA-1"] = "L9"
    return encode(bundle)


BAD = [
    ("oversized", lambda: encode(make_bundle({"151673": {f"B{i:07d}-1": "L1" for i in range(12_000)}})),
     "application/json", 413, f"the limit is {BODY_LIMIT} bytes"),
    ("invalid JSON", lambda: b'{"schema_version": 1,', "application/json", 400, "invalid JSON"),
    ("NaN", lambda: encode(make_bundle(LABELS)).replace(b'"L1"', b"NaN"), "application/json", 400, "NaN is not JSON"),
    ("not JSON at all", lambda: b"<html><script>alert(1)</script></html>", "text/html", 415, "application/json"),
    ("schema: member missing", lambda: _mutated(lambda b: b.pop("software")), "application/json", 422,
     "'software' is a required property"),
    ("schema: non-string label", lambda: _mutated(lambda b: b["slides"][0]["labels"].update({"AAACAAGTATCTCCCA-1": 4})),
     "application/json", 422, "a label is a string"),
    ("schema: NaN spelled as a label",
     lambda: _mutated(lambda b: b["slides"][0]["labels"].update({"AAACAAGTATCTCCCA-1": "nan"})),
     "application/json", 422, "missing-value spelling"),
    ("HTML in a text field", lambda: _mutated(lambda b: b["method"].update(name="<img src=x onerror=alert(1)>")),
     "application/json", 422, "no HTML"),
    ("script in the description", lambda: _mutated(lambda b: b["method"].update(description="<script>x()</script>")),
     "application/json", 422, "HTML is not accepted"),
    ("path separator in a slide id", lambda: _mutated(lambda b: b["slides"][0].update(slide_id="dlpfc/151673")),
     "application/json", 422, "no path separators"),
    ("'..' in a slide id", lambda: _mutated(lambda b: b["slides"][0].update(slide_id="..")),
     "application/json", 422, "without '..'"),
    ("'..' in the method name", lambda: _mutated(lambda b: b["method"].update(name="x..y")),
     "application/json", 422, "without '..'"),
    ("hash does not match", _wrong_hash, "application/json", 422, "does not match the content"),
    ("too many distinct labels",
     lambda: _mutated(lambda b: b["slides"][0].update(labels={f"B{i}-1": f"c{i}" for i in range(MAX_DISTINCT_LABELS + 5)})),
     "application/json", 422, f"{MAX_DISTINCT_LABELS + 5} distinct labels"),
]


@pytest.mark.parametrize("what, body, content_type, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_with_a_clear_reason(relay, what, body, content_type, status, words):
    before = relay.queued()
    got, answer, _ = relay.post(body(), content_type=content_type)
    assert got == status and answer["status"] == "refused" and words in answer["reason"], (what, got, answer)
    assert relay.queued() == before


def test_oversized_chunked_body_is_cut_off_while_reading(relay):
    before = relay.queued()
    connection = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
    try:
        connection.putrequest("POST", "/v1/submissions")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        chunk = b" " * 65_536
        for _ in range(BODY_LIMIT // len(chunk) + 2):
            connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        connection.send(b"0\r\n\r\n")
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 413 and "over the limit" in answer["reason"], answer
    assert relay.queued() == before


def test_a_flood_from_one_client_gets_429(tmp_path):
    strict = Relay(tmp_path, "--rate-limit", "5", "--rate-window", "600", env={"MIHD_HOME": str(tmp_path)})
    try:
        statuses = [strict.post(b"{}")[0] for _ in range(5)]
        status, answer, headers = strict.post(encode(make_bundle(LABELS)))
        assert statuses == [422] * 5
        assert status == 429 and "rate limit: at most 5 submissions per 600 s" in answer["reason"], answer
        assert 0 < int(headers["Retry-After"]) <= 600
        assert strict.queued() == []
    finally:
        strict.stop()


# --------------------------------------------------------------------------- end to end

def _mihd(args: list[str], env: dict, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dagster_project.cli", *args], cwd=REPO, env={**BASE_ENV, **env},
                          stdin=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def held_slides(tiny_slides, tmp_path_factory):
    """The platform's raw_slide of both tiny slides, materialized through Dagster."""
    from dagster import DagsterInstance, materialize

    from mihd_assets.slides import assets as slides
    from tests.conftest import slide_resources

    tmp = tmp_path_factory.mktemp("held")
    root = tmp / "root"
    shutil.copytree(tiny_slides, root)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", ["demo_01", "demo_02"])
    store = tmp / "storage"
    resources = slide_resources(root, store, tmp / "mihd.duckdb")
    for slide in ("demo_01", "demo_02"):
        assert materialize([slides.raw_slide], partition_key=slide, instance=instance, resources=resources).success
    return tmp, instance, store, resources


def _truth_labels(raw, flip: float, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    truth = raw.obs["truth"].astype(object).where(raw.obs["truth"].notna(), "unlabelled").to_numpy()
    layers = sorted(set(truth))
    out = {}
    for barcode, value in zip(raw.obs_names, truth):
        out[barcode] = str(rng.choice(layers)) if rng.random() < flip else str(value)
    return out


def _write_csv(path, labels: dict[str, str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["barcode", "label"])
        writer.writerows(labels.items())


def test_submission_is_queued_ingested_rescored_and_shown(held_slides, tmp_path, monkeypatch):
    from dagster import build_sensor_context, materialize

    from mihd_assets.leaderboard.assets import leaderboard_site, leaderboard_submissions, submission_queue_sensor
    from mihd_resources.metrics_store import read_only_query
    from tests.leaderboard.platform_fixture import platform_rows
    from mihd_resources.metrics_store import write_partition_tables

    tmp, instance, store, resources = held_slides
    relay = Relay(tmp_path, env={"MIHD_HOME": str(tmp_path)})
    try:
        raw = ad.read_h5ad(store / "slides" / "raw_slide" / "demo_01.h5ad")
        labels = _truth_labels(raw, flip=0.3, seed=5)
        labels_csv = tmp_path / "demo_01.csv"
        _write_csv(labels_csv, labels)
        env = {"MIHD_HOME": str(tmp_path), "MIHD_RELAY_URL": relay.base}
        submit = ["submit", "--name", "Layer Finder", "--version", "2.1", "--description", "Thirty percent noise.",
                  "--link", "https://example.org/layer-finder", "--labels", f"demo_01={labels_csv}"]

        # No terminal and no --upload: shown, never sent.
        shown = _mihd(submit, env)
        assert shown.returncode == 3, shown.stdout + shown.stderr
        assert "not sent: standard input is not a terminal" in shown.stdout and '"name": "Layer Finder"' in shown.stdout
        assert relay.queued() == []

        sent = _mihd([*submit, "--upload"], env)
        assert sent.returncode == 0 and "queued: receipt id" in sent.stdout, sent.stdout + sent.stderr
        assert f"destination: POST {relay.base}/v1/submissions" in sent.stdout
        (queued,) = relay.queued()
        again = _mihd([*submit, "--upload"], env)
        assert again.returncode == 1 and f"duplicate: the same content" in again.stdout and queued.stem in again.stdout
        assert relay.queued() == [queued]

        # Bundles the relay cannot judge (it holds no slides): the ingest rejects each, with its reason.
        other = _truth_labels(raw, flip=0.3, seed=6)
        foreign = dict(other, **{"GGGGGGGGGGGGGGGG-7": "L1"})
        missing = dict(list(other.items())[:-3])
        many = {b: f"c{i % 40}" for i, b in enumerate(other)}
        rejected = {
            "Unknown Slide": ({"151673": other}, "slide '151673' is not on the platform (slides held: demo_01, demo_02)"),
            "Foreign Barcode": ({"demo_01": foreign}, "1 submitted barcode(s) are not spots of the platform's slide"),
            "Missing Spots": ({"demo_01": missing}, f"3 of {raw.n_obs} spots have no label"),
            "Many Labels": ({"demo_01": many}, "40 distinct labels for"),
        }
        for name, (slide_labels, _) in rejected.items():
            status, answer, _ = relay.post(make_bundle(slide_labels, name=name))
            assert status == 202, answer
        assert len(relay.queued()) == 5

        # Built-in entries: the platform's own clustering rows, as the evaluation assets write them.
        database = tmp / "mihd.duckdb"
        write_partition_tables(database, None, "evaluation/clustering_metrics/gene_pca__kmeans", "demo_01",
                               {"clustering_metrics": platform_rows("demo_01", "gene_pca", "kmeans", 0.31, 0.35)},
                               run_id="t", code_version="1")
        for key, value in {"MIHD_RELAY_QUEUE": str(relay.queue), "MIHD_STORAGE": str(store)}.items():
            monkeypatch.setenv(key, value)

        # The queue sensor sees new files: one observation of the queue and one ingest run.
        with build_sensor_context(instance=instance) as context:
            tick = submission_queue_sensor(context)
        (request,) = tick.run_requests
        (observation,) = tick.asset_events
        assert "5 files" in request.tags["mihd/reason"]
        instance.report_runless_asset_event(observation)
        with build_sensor_context(instance=instance) as context:
            assert not submission_queue_sensor(context).run_requests  # observed: nothing new
        result = materialize([leaderboard_submissions, leaderboard_site], instance=instance,
                             resources={"metrics": resources["metrics"], "anndata_io_manager": resources["anndata_io_manager"]},
                             tags=request.tags)
        assert result.success

        rows = read_only_query(database, "SELECT * FROM submissions ORDER BY submission_id")
        assert len(rows) == 5
        accepted = rows[rows["status"] == "accepted"]
        assert accepted["submission_id"].tolist() == [queued.stem] and accepted["method_name"].tolist() == ["Layer Finder"]
        by_name = rows.set_index("method_name")
        for name, (_, words) in rejected.items():
            assert by_name.loc[name, "status"] == "rejected" and words in by_name.loc[name, "reason"], by_name.loc[name]
        (score,) = read_only_query(database, "SELECT * FROM submission_scores").to_dict(orient="records")
        known = raw.obs["truth"].notna().to_numpy()
        expected = adjusted_rand_score(raw.obs["truth"].astype(str).to_numpy()[known],
                                       np.asarray([labels[b] for b in raw.obs_names])[known])
        assert score["ari"] == pytest.approx(expected, abs=1e-12) and score["slide_id"] == "demo_01"
        entries = read_only_query(database, "SELECT * FROM leaderboard_entries ORDER BY rank")
        assert sorted(entries["method_name"]) == ["Layer Finder", "gene_pca · kmeans", "gene_pca · kmeans + majority_k15"]

        site = store / "reports" / "leaderboard_site"
        index = (site / "index.html").read_text()
        assert "Layer Finder" in index and "gene_pca · kmeans" in index
        method_page = site / "methods" / f"submission--{queued.stem}.html"
        assert f"{score['ari']:.3f}" in method_page.read_text()
        log = (site / "submissions.html").read_text()
        assert all(name in log for name in rejected) and "not on the platform" in log
        public = json.loads((site / "data" / "submissions.json").read_text())
        assert len(public) == 5 and all("client_hash" not in r for r in public)
    finally:
        relay.stop()
    assert not relay.running()

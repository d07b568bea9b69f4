"""Ingest of queued bundles: accepted ones are scored by the platform (never by the numbers
they claim), every bad one is rejected with its reason, the same content twice is a duplicate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from mihd_assets.leaderboard.ingest import MAX_QUEUE_FILE_BYTES, ingest_queue, max_labels_for
from mihd_relay.bundle import encode
from mihd_relay.queue import QUEUE_FORMAT, SubmissionQueue, new_receipt_id, queue_fingerprint, queued_files
from tests.leaderboard.helpers import make_bundle, noisy_labels, platform_slide, rehash

CLIENT = "0" * 32


@pytest.fixture
def slides():
    return {"s1": platform_slide("s1", n=150, layers=4, seed=0), "s2": platform_slide("s2", n=100, layers=5, seed=1),
            "bare": platform_slide("bare", n=60, layers=3, seed=2, with_truth=False)}


def _run(queue, slides):
    return ingest_queue(queued_files(queue), slides.get, sorted(slides))


def _raw_file(queue, bundle, **envelope) -> str:
    """A queue file written as the relay would, but without its checks (another writer)."""
    receipt = new_receipt_id()
    body = {"format": QUEUE_FORMAT, "receipt_id": receipt, "received_at": "2026-11-02T10:00:00.000+00:00",
            "client": CLIENT, "bundle": bundle, **envelope}
    queue.mkdir(parents=True, exist_ok=True)
    (queue / f"{receipt}.json").write_text(json.dumps(body))
    return receipt


def test_accepted_bundle_is_rescored_against_platform_truth(tmp_path, slides):
    queue = SubmissionQueue(tmp_path / "q", max_queued=100)
    labels = {"s1": noisy_labels(slides["s1"], 0.2), "s2": noisy_labels(slides["s2"], 0.5)}
    bundle = make_bundle(labels, claimed={"s1": {"ari": 1.0, "nmi": 1.0}})
    receipt, duplicate, _ = queue.receive(bundle, CLIENT)
    assert duplicate is None
    result = _run(queue.root, slides)
    (row,) = result.submissions
    assert row["status"] == "accepted" and row["reason"] is None and row["submission_id"] == receipt
    assert row["content_hash"] == bundle["content_hash"] and row["method_name"] == "BandFinder"
    by_slide = {s["slide_id"]: s for s in result.scores}
    for slide_id in ("s1", "s2"):
        slide = slides[slide_id]
        known = slide.labelled
        truth = np.asarray([str(t) for t in slide.truth[known]])
        predicted = np.asarray([labels[slide_id][bc] for bc in np.asarray(slide.barcodes)[known]])
        assert by_slide[slide_id]["ari"] == pytest.approx(adjusted_rand_score(truth, predicted), abs=1e-12)
        assert by_slide[slide_id]["nmi"] == pytest.approx(normalized_mutual_info_score(truth, predicted), abs=1e-12)
        assert by_slide[slide_id]["n_spots"] == len(slide.barcodes)
        assert by_slide[slide_id]["n_labelled"] == int(known.sum()) < len(slide.barcodes)
        assert 0 <= by_slide[slide_id]["pas"] <= 1 and by_slide[slide_id]["chaos"] > 0
    # The claimed ARI of 1.0 is recorded, not used: 20% of the spots were flipped.
    assert by_slide["s1"]["claimed_ari"] == 1.0 and by_slide["s1"]["ari"] < 0.9
    assert by_slide["s2"]["ari"] < by_slide["s1"]["ari"]


def test_same_content_twice_is_a_duplicate_of_the_first(tmp_path, slides):
    queue = tmp_path / "q"
    bundle = make_bundle({"s1": noisy_labels(slides["s1"], 0.1)})
    first = _raw_file(queue, bundle)
    second = _raw_file(queue, json.loads(json.dumps(bundle, sort_keys=True)))  # other key order, same content
    result = _run(queue, slides)
    rows = {r["submission_id"]: r for r in result.submissions}
    assert rows[first]["status"] == "accepted"
    assert rows[second]["status"] == "rejected" and rows[second]["duplicate_of"] == first
    assert rows[second]["reason"].startswith("duplicate: the same content")
    assert {s["submission_id"] for s in result.scores} == {first}
    # The relay's side: a second receive of the same content queues nothing and names the first receipt.
    relay_queue = SubmissionQueue(tmp_path / "relay", max_queued=10)
    r1, d1, _ = relay_queue.receive(bundle, CLIENT)
    r2, d2, _ = relay_queue.receive(bundle, CLIENT)
    assert d1 is None and r2 == d2 == r1 and len(queued_files(relay_queue.root)) == 1


def _labels_with(slides, change):
    labels = noisy_labels(slides["s1"], 0.1)
    change(labels)
    return labels


@pytest.mark.parametrize("make, words", [
    (lambda s: make_bundle({"nope": noisy_labels(s["s1"], 0.1)}),
     "slide 'nope' is not on the platform (slides held: bare, s1, s2)"),
    (lambda s: make_bundle({"s1": _labels_with(s, lambda l: l.update({"GGGGGGGGGGGGGGGG-9": "c1"}))}),
     "1 submitted barcode(s) are not spots of the platform's slide (e.g. 'GGGGGGGGGGGGGGGG-9')"),
    (lambda s: make_bundle({"s1": _labels_with(s, lambda l: [l.pop(k) for k in list(l)[:7]])}),
     "7 of 150 spots have no label"),
    (lambda s: make_bundle({"s1": {bc: f"c{i % 40}" for i, bc in enumerate(s["s1"].barcodes)}}),
     f"40 distinct labels for 4 layers; at most {max_labels_for(4)} are accepted"),
    (lambda s: make_bundle({"bare": noisy_labels(s["bare"], 0.1)}), "has no truth labels on the platform"),
])
def test_platform_checks_reject_with_the_reason(tmp_path, slides, make, words):
    queue = tmp_path / "q"
    _raw_file(queue, make(slides))
    result = _run(queue, slides)
    (row,) = result.submissions
    assert row["status"] == "rejected" and words in row["reason"], row["reason"]
    assert result.scores == []


def _html_named(slides):
    bundle = make_bundle({"s1": noisy_labels(slides["s1"], 0.1)})
    bundle["method"]["name"] = "<script>alert(1)</script>"
    return rehash(bundle)


def _wrong_hash(slides):
    bundle = make_bundle({"s1": noisy_labels(slides["s1"], 0.1)})
    bundle["slides"][0]["labels"][slides["s1"].barcodes[0]] = "c3"
    return bundle


def _number_label(slides):
    bundle = make_bundle({"s1": noisy_labels(slides["s1"], 0.1)})
    bundle["slides"][0]["labels"][slides["s1"].barcodes[0]] = 0.5
    return rehash(bundle)


@pytest.mark.parametrize("make, words", [
    (_html_named, "no HTML"),
    (_wrong_hash, "does not match the content"),
    (_number_label, "a label is a string"),
])
def test_bundles_the_relay_would_refuse_are_rejected_here_too(tmp_path, slides, make, words):
    queue = tmp_path / "q"
    _raw_file(queue, make(slides))
    (row,) = _run(queue, slides).submissions
    assert row["status"] == "rejected" and words in row["reason"], row["reason"]


def test_unreadable_queue_files_are_rejected_and_foreign_names_ignored(tmp_path, slides):
    queue = tmp_path / "q"
    queue.mkdir()
    good = make_bundle({"s1": noisy_labels(slides["s1"], 0.1)})
    nan_file = new_receipt_id()
    (queue / f"{nan_file}.json").write_text('{"format": NaN}')
    broken = new_receipt_id()
    (queue / f"{broken}.json").write_text("{")
    big = new_receipt_id()
    with open(queue / f"{big}.json", "wb") as fh:
        fh.truncate(MAX_QUEUE_FILE_BYTES + 1)
    bad_envelope = _raw_file(queue, good, client="127.0.0.1")
    other_receipt = _raw_file(queue, good, receipt_id="00000000000000000000-0000000000000000")
    (queue / "notes.json").write_text(encode(good).decode())
    result = _run(queue, slides)
    rows = {r["submission_id"]: r for r in result.submissions}
    assert result.ignored == ["notes.json"]
    assert "NaN is not JSON" in rows[nan_file]["reason"]
    assert rows[broken]["reason"].startswith("queue file: invalid JSON")
    assert f"files over {MAX_QUEUE_FILE_BYTES} bytes are not read" in rows[big]["reason"]
    assert "client is not a 32-hex-digit address hash" in rows[bad_envelope]["reason"]
    assert rows[bad_envelope]["client_hash"] is None
    assert "its receipt id is not the file's name" in rows[other_receipt]["reason"]
    assert all(r["status"] == "rejected" for r in result.submissions) and result.scores == []


def test_rejections_leave_accepted_entries_unchanged(tmp_path, slides):
    queue = tmp_path / "q"
    _raw_file(queue, make_bundle({"s1": noisy_labels(slides["s1"], 0.1)}))
    before = _run(queue, slides)
    _raw_file(queue, _html_named(slides))
    _raw_file(queue, make_bundle({"nope": noisy_labels(slides["s1"], 0.1)}))
    after = _run(queue, slides)
    assert [r for r in after.submissions if r["status"] == "accepted"] == before.accepted
    assert after.scores == before.scores
    assert len(after.rejected) == 2


def test_queue_fingerprint_follows_the_files(tmp_path, slides):
    queue = SubmissionQueue(tmp_path / "q", max_queued=100)
    empty = queue_fingerprint(queue.root)
    queue.receive(make_bundle({"s1": noisy_labels(slides["s1"], 0.1)}), CLIENT)
    one = queue_fingerprint(queue.root)
    assert one != empty and queue_fingerprint(queue.root) == one

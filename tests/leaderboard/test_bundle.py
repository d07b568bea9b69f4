"""The submission bundle: the schema file is valid and versioned, the content hash covers the
content and nothing else, and every bad input is refused with a reason that names it."""

from __future__ import annotations

import copy
import json

import pytest

from mihd_relay import bundle as b
from tests.leaderboard.helpers import make_bundle, rehash

LABELS = {"151673": {"AAAC-1": "L1", "AAAG-1": "L2", "AAAT-1": "L1"}}


def _refused(data) -> b.Refusal:
    with pytest.raises(b.Refusal) as info:
        b.parse_bundle(data if isinstance(data, bytes) else b.encode(data))
    return info.value


def test_schema_file_is_valid_draft_2020_12_and_versioned():
    from jsonschema import Draft202012Validator

    schema = json.loads(b.SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    assert b.SCHEMA_PATH.name == "submission-bundle-1.schema.json"
    assert schema["$id"].endswith(":1") and schema["properties"]["schema_version"]["const"] == b.SCHEMA_VERSION == 1


def test_a_valid_bundle_passes_and_its_hash_ignores_key_order():
    bundle = make_bundle(LABELS)
    assert b.parse_bundle(b.encode(bundle)) == bundle
    reordered = json.loads(json.dumps(bundle, sort_keys=True))
    reordered_text = json.dumps(dict(reversed(list(reordered.items())))).encode()
    assert b.parse_bundle(reordered_text)["content_hash"] == bundle["content_hash"]
    assert b.content_hash(bundle) == bundle["content_hash"]
    # One label changed is another content.
    changed = copy.deepcopy(bundle)
    changed["slides"][0]["labels"]["AAAC-1"] = "L2"
    assert b.content_hash(changed) != bundle["content_hash"]


def test_inlined_schema_has_no_references_and_accepts_the_same():
    from jsonschema import Draft202012Validator

    inlined = b.inlined_schema()
    assert "$ref" not in json.dumps(inlined) and "$defs" not in inlined
    validator = Draft202012Validator(inlined)
    assert validator.is_valid(make_bundle(LABELS))
    bad = make_bundle(LABELS)
    bad["slides"][0]["labels"]["AAAC-1"] = 3
    assert not validator.is_valid(bad)


@pytest.mark.parametrize("data, kind, words", [
    (b"{not json", "invalid_json", "invalid JSON: Expecting property name"),
    (b'{"schema_version": NaN}', "invalid_json", "NaN is not JSON"),
    (b'{"schema_version": Infinity}', "invalid_json", "Infinity is not JSON"),
    (b'{"schema_version": 1e999}', "invalid_json", "out of range"),
    (b'{"a": 1, "a": 2}', "invalid_json", "appears twice"),
    (b"\xff\xfe{}", "invalid_json", "not UTF-8"),
    (b"[" * 100_000, "invalid_json", "invalid JSON"),
])
def test_invalid_json_is_refused_saying_why(data, kind, words):
    refusal = _refused(data)
    assert refusal.kind == kind and words in refusal.reason, refusal.reason


def _mutated(change) -> dict:
    bundle = make_bundle(LABELS)
    change(bundle)
    return rehash(bundle)


@pytest.mark.parametrize("change, words", [
    (lambda x: x.pop("method"), "'method' is a required property"),
    (lambda x: x.update(extra=1), "Additional properties are not allowed"),
    (lambda x: x.update(schema_version=2), "schema_version must be 1"),
    (lambda x: x["slides"][0]["labels"].update({"AAAC-1": 3}), "a label is a string"),
    (lambda x: x["slides"][0]["labels"].update({"AAAC-1": None}), "a label is a string"),
    (lambda x: x["slides"][0]["labels"].update({"AAAC-1": "NaN"}), "missing-value spelling"),
    (lambda x: x["slides"][0]["labels"].update({"AAAC-1": ""}), "a label is a string"),
    (lambda x: x["method"].update(name="<script>alert(1)</script>"), "no HTML"),
    (lambda x: x["method"].update(description="nice <img src=x onerror=alert(1)>"), "HTML is not accepted"),
    (lambda x: x["method"].update(link="javascript:alert(1)"), "an https:// URL"),
    (lambda x: x["method"].update(link="https://example.org/\"><script>"), "an https:// URL"),
    (lambda x: x["method"].update(name="a/b"), "no path separators"),
    (lambda x: x["method"].update(name="a..b"), "without '..'"),
    (lambda x: x["slides"][0].update(slide_id="../etc"), "no path separators"),
    (lambda x: x["slides"][0].update(slide_id="a/b"), "no path separators"),
    (lambda x: x["slides"][0].update(slide_id="a..b"), "without '..'"),
    (lambda x: x["slides"][0]["labels"].update({"../x": "L1"}), "a barcode is 1-64 letters"),
    (lambda x: x["slides"][0].update(claimed_scores={"ari": 7}), "greater than the maximum of 1"),
    (lambda x: x.update(slides=[]), "slides is a list of 1-64 slides"),
])
def test_schema_violations_are_refused_naming_the_field(change, words):
    refusal = _refused(_mutated(change))
    assert refusal.kind == "schema" and words in refusal.reason, refusal.reason
    assert refusal.reason.split(":")[0].startswith("$") or "problems" in refusal.reason


def test_content_checks_after_the_schema():
    wrong_hash = make_bundle(LABELS)
    wrong_hash["slides"][0]["labels"]["AAAC-1"] = "L3"  # changed after hashing
    refusal = _refused(wrong_hash)
    assert refusal.kind == "content" and "does not match the content" in refusal.reason

    twice = make_bundle(LABELS)
    twice["slides"].append(copy.deepcopy(twice["slides"][0]))
    refusal = _refused(rehash(twice))
    assert "appears more than once" in refusal.reason

    many = {f"B{i}-1": f"c{i}" for i in range(b.MAX_DISTINCT_LABELS + 1)}
    refusal = _refused(rehash({**make_bundle(LABELS), "slides": [{"slide_id": "151673", "labels": many}]}))
    assert refusal.kind == "content" and f"{b.MAX_DISTINCT_LABELS + 1} distinct labels" in refusal.reason


def test_many_problems_are_counted_not_all_listed():
    bundle = make_bundle({"151673": {f"B{i}-1": "L1" for i in range(200)}})
    for key in bundle["slides"][0]["labels"]:
        bundle["slides"][0]["labels"][key] = "<x>"  # one problem per spot: the pattern
    refusal = _refused(rehash(bundle))
    assert refusal.reason.startswith("200 problems; first: $.slides[0].labels.B")
    assert len(refusal.problems) == b.MAX_PROBLEMS + 1 and refusal.problems[-1] == "... and 180 more"


def test_build_bundle_refuses_what_the_relay_would():
    with pytest.raises(b.Refusal, match="no HTML"):
        make_bundle(LABELS, name="<b>bold</b>")


def test_relay_paths_follow_the_platform_settings(monkeypatch, tmp_path):
    from mihd_relay import paths
    from mihd_resources import settings

    monkeypatch.setenv("MIHD_HOME", str(tmp_path / "home"))
    assert paths.mihd_home() == settings.mihd_home() == (tmp_path / "home").resolve()
    assert paths.queue_dir() == settings.mihd_home() / "relay" / "queue"
    monkeypatch.delenv("MIHD_HOME")
    monkeypatch.chdir(tmp_path)
    assert paths.mihd_home() == settings.mihd_home()
    monkeypatch.setenv("MIHD_RELAY_QUEUE", str(tmp_path / "q"))
    assert paths.queue_dir() == (tmp_path / "q").resolve()


def test_the_relay_side_imports_no_dagster():
    import subprocess
    import sys

    from tests.conftest import BASE_ENV, REPO

    code = ("import sys, mihd_relay.app, mihd_relay.client, mihd_relay.server, mihd_relay.queue; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'mihd_resources')); "
            "print(loaded); sys.exit(1 if loaded else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=BASE_ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

"""The UI as a user drives it: `dagster-webserver` + `dagster-daemon` over a materialized home,
headless Chromium (Debian's), each in its own process group.

1. For one asset of every family (slides, embeddings, fusion, clustering, geometry,
   segmentation): click Materialize, launch it (for a demo slide when partitioned), wait for the
   run to succeed on its run page, open the asset's Checks tab.
2. Change a demo slide's counts file: `mihd materialize --dry-run` lists `raw_slide` and the UI
   shows that partition "Unsynced"; materialize it from the UI and the UI marks its children
   unsynced, exactly the set the dry run then lists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import pytest

from tests.conftest import BASE_ENV, run_cli
from tests.test_ui import (
    _SKIP,
    CHROMIUM,
    CHROMIUM_ARGS,
    _free_port,
    _skip_community_dialog,
    _wait_for_server,
)
from tests.services.dagster_services import stop_group, tail

pytestmark = [
    pytest.mark.ui,
    pytest.mark.slow,
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.timeout(1200),
]

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_MS = 300_000
# (asset path, partition or None, a check the Checks tab must list, or None for "no checks")
ONE_PER_FAMILY = [
    ("slides/raw_slide", "demo_01", "spots_on_tissue"),
    ("embeddings/vision_resnet50_standard", "demo_01", "weights_not_random"),
    ("fusion/concat__pca__uni2_standard", "demo_01", None),
    ("clustering/gene_pca__kmeans", "demo_01", "clustering_method_as_requested"),
    ("geometry/geometry_training_set", None, None),
    ("segmentation/e1_checkpoint_baseline", None, "weights_not_random"),
]


@pytest.fixture
def ui_home(materialized_home, tmp_path):
    """A private copy of the materialized home and its slides (this test changes files), with a
    small segmentation cohort and a geometry plan over the two tiny slides."""
    from mihd_assets.demo.rosmap import RosmapDemoSpec, generate_rosmap_demo

    home, data = tmp_path / "home", tmp_path / "data"
    shutil.copytree(materialized_home["MIHD_HOME"], home, symlinks=True)
    shutil.copytree(materialized_home["MIHD_DATA_ROOT"], data)
    cohort = tmp_path / "rosmap"
    generate_rosmap_demo(cohort, RosmapDemoSpec(n_donors=6, tiles_per_donor=1))
    return {
        **materialized_home,
        "MIHD_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster_home"),
        "MIHD_DATA_ROOT": str(data),
        "MIHD_TILES_ROOT": str(cohort / "tiles"),
        "MIHD_CLINICAL": str(cohort / "clinical.csv"),
        "MIHD_GEOMETRY_TRAIN_SLIDES": "demo_01",
        "MIHD_GEOMETRY_HELDOUT_SLIDES": "demo_02",
    }


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as fh:
        return subprocess.Popen(args, cwd=REPO, env={**BASE_ENV, **env}, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _graphql(base: str, query: str, variables: dict) -> dict:
    request = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query, "variables": variables}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        payload = json.loads(resp.read())
    assert "errors" not in payload, payload
    return payload["data"]


def _ui_unsynced(base: str, partition: str) -> set[str]:
    """What the UI marks unsynced or missing for one slide: the webserver's own stale status of
    every slide-partitioned asset (assets partitioned by donor or cell dataset have no such partition)."""
    nodes = _graphql(base, "{ assetNodes { assetKey { path } isMaterializable partitionDefinition { name } } }", {})
    keys = [n["assetKey"] for n in nodes["assetNodes"]
            if n["isMaterializable"] and (n["partitionDefinition"] or {}).get("name") == "slides"]
    data = _graphql(base, """
        query($keys: [AssetKeyInput!]!, $p: String!) {
          assetNodes(assetKeys: $keys) { assetKey { path } staleStatus(partition: $p) } }""",
                    {"keys": keys, "p": partition})
    return {"/".join(n["assetKey"]["path"]) for n in data["assetNodes"] if n["staleStatus"] in ("STALE", "MISSING")}


def _dry_run_lists(env: dict, partition: str) -> set[str]:
    result = run_cli(["materialize", "--dry-run", "--partition", partition], env)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = set(re.findall(r"^    (\S+) \(", result.stdout, flags=re.M))
    print(f"mihd materialize --dry-run --partition {partition}:\n{result.stdout}")  # shown when the test fails
    return listed


def _materialize_from_ui(page, base: str, asset: str, partition: str | None) -> None:
    """Materialize from the asset's page as a user does, then follow the run to "Success"."""
    from playwright.sync_api import expect

    page.goto(f"{base}/assets/{asset}")
    _skip_community_dialog(page)
    if partition is None:
        # The accessible name starts with the icon's ligature text, so match the end only.
        page.get_by_role("button", name=re.compile(r"Materialize(…)?$")).first.click()
        # An asset with run config opens the launchpad first; launch it with the defaults.
        launchpad = page.locator("[role=dialog]").get_by_role("button", name=re.compile(r"(Materialize|Launch[^)]*)$"))
        toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
        expect(toast.or_(launchpad.last)).to_be_visible()
        if not toast.is_visible():
            launchpad.last.click()
    else:
        page.get_by_role("button", name="Materialize…").first.click()
        dialog = page.locator("[role=dialog]")
        picker, search = dialog.get_by_text("Select a partition or create one"), page.get_by_placeholder("Filter partitions")
        for _ in range(3):  # the picker ignores a click that lands while the dialog is still rendering
            picker.click()
            try:
                search.wait_for(state="visible", timeout=10_000)
                break
            except Exception:  # noqa: BLE001 - playwright's TimeoutError: click again
                continue
        search.fill(partition)
        # The picker renders in a portal at the end of the page; the asset page may show the same
        # partition name (its latest materialization) under the dialog.
        page.locator(f"text={partition} >> visible=true").last.click()
        page.keyboard.press("Escape")
        dialog.get_by_role("button", name="Launch 1 run").click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    expect(toast).to_be_visible()
    prefix = re.search(r"Launched run ([0-9a-f]{8})", toast.inner_text()).group(1)
    runs = _graphql(base, "{ runsOrError(limit: 20) { ... on Runs { results { runId } } } }", {})
    (run_id,) = [r["runId"] for r in runs["runsOrError"]["results"] if r["runId"].startswith(prefix)]
    page.goto(f"{base}/runs/{run_id}")
    # The run page's status tag turns "Success" when the daemon-launched run ends.
    expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=RUN_TIMEOUT_MS)


def _assert_checks_tab(page, base: str, asset: str, check: str | None) -> None:
    from playwright.sync_api import expect

    page.goto(f"{base}/assets/{asset}?view=checks")
    if check is None:
        expect(page.get_by_text("No checks defined for this asset")).to_be_visible()
    else:
        # Long names are drawn truncated, beside a hidden full-width copy used for measuring:
        # the check must be among the visible matches.
        expect(page.get_by_text(check, exact=True).filter(visible=True).first).to_be_visible()


def _change_counts(slide_folder: Path) -> None:
    """One more UMI in the first stored count: a real change of the counts file."""
    with h5py.File(slide_folder / "filtered_feature_bc_matrix.h5", "r+") as fh:
        data = fh["matrix"]["data"]
        data[0] = data[0] + 1


def test_ui_materializes_every_family_and_marks_changed_slides_unsynced(ui_home, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    bindir = Path(sys.executable).parent
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    web_log, daemon_log = tmp_path / "webserver.log", tmp_path / "daemon.log"
    web = _start([str(bindir / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                 ui_home, web_log)
    daemon = _start([str(bindir / "dagster-daemon"), "run", "-w", "workspace.yaml"], ui_home, daemon_log)
    shot = tmp_path / "last.png"
    page_errors: list[str] = []
    try:
        _wait_for_server(base, web, web_log)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.set_default_timeout(60_000)
                page.on("pageerror", lambda exc: page_errors.append(str(exc)))
                page.goto(f"{base}/runs")
                _skip_community_dialog(page)

                for asset, partition, check in ONE_PER_FAMILY:
                    try:
                        started = time.monotonic()
                        _materialize_from_ui(page, base, asset, partition)
                        _assert_checks_tab(page, base, asset, check)
                        print(f"{asset}: materialized from the UI in {time.monotonic() - started:.1f} s")
                    except Exception as exc:  # noqa: BLE001 - playwright's TimeoutError too; re-raised with the asset
                        page.screenshot(path=str(shot), full_page=True)
                        raise AssertionError(f"{asset}: {exc}") from exc

                # --- a changed counts file: raw_slide unsynced, then its children ---
                _change_counts(Path(ui_home["MIHD_DATA_ROOT"]) / "demo_01")
                listed = _dry_run_lists(ui_home, "demo_01")  # observes the slide's files
                assert listed == {"slides/raw_slide"}
                assert _ui_unsynced(base, "demo_01") == listed
                page.goto(f"{base}/assets/slides/raw_slide?view=partitions&partition=demo_01")
                expect(page.get_by_text(re.compile(r"^Unsynced \(\d+\)$")).first).to_be_visible()

                _materialize_from_ui(page, base, "slides/raw_slide", "demo_01")
                children = _ui_unsynced(base, "demo_01")
                assert {"slides/preprocessed_slide_standard", "slides/slide_qc_metrics",
                        "embeddings/vision_resnet50_standard", "clustering/gene_pca__kmeans"} <= children
                assert "slides/raw_slide" not in children and "embeddings/gene_pca" not in children
                assert _dry_run_lists(ui_home, "demo_01") == children
                page.goto(f"{base}/assets/slides/preprocessed_slide_standard?view=partitions&partition=demo_01")
                expect(page.get_by_text(re.compile(r"^Unsynced \(\d+\)$")).first).to_be_visible()
                page.screenshot(path=str(shot), full_page=True)
                assert _ui_unsynced(base, "demo_02") == set(), "the other slide stays in sync"
            finally:
                browser.close()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nscreenshot {shot}; page errors {page_errors}\nwebserver log:\n{tail(web_log)}"
                             f"\ndaemon log:\n{tail(daemon_log)}") from exc
    finally:
        stop_group(daemon)
        stop_group(web)

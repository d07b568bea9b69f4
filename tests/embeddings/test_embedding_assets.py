"""Embedding assets through Dagster: bad weights, missing settings and missing images fail
the one partition with a message naming the file or setting; other partitions still run."""

import shutil

import pytest
import torch
from dagster import DagsterInstance, materialize
from dagster_duckdb import DuckDBResource

from mihd_resources.orchestration import user_error
from mihd_assets.embeddings import assets as emb
from mihd_assets.embeddings.store import SpotEmbedding
from mihd_assets.embeddings.vision import create_encoder_model
from mihd_assets.slides import assets as slides
from mihd_resources import AnnDataIOManager, ComputeResource, MetricsStore, StorageResource
from mihd_resources.embedding_io_manager import EmbeddingIOManager
from mihd_resources.weights import ModelWeightsResource
from mihd_resources.step_executor import StepExecutor

UNI = emb.vision_key("uni", "standard")
VISION_UNI = emb.vision_asset_for(UNI)  # the step of every `standard` encoder; tests select uni alone


@pytest.fixture
def env(tiny_slides, tmp_path, monkeypatch):
    monkeypatch.setenv("MIHD_PROFILE", "demo")
    root = tmp_path / "root"
    for name in ("demo_01", "demo_02"):
        shutil.copytree(tiny_slides / name, root / name)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", ["demo_01", "demo_02"])
    resources = {
        "storage": StorageResource(slides_root=str(root)),
        "anndata_io_manager": AnnDataIOManager(base_dir=str(tmp_path / "store")),
        "embedding_io_manager": EmbeddingIOManager(base_dir=str(tmp_path / "store")),
        "compute": ComputeResource(device="cpu", batch_size=32, num_workers=0),
        "step_executor": StepExecutor(),
        "metrics": MetricsStore(duckdb=DuckDBResource(database=str(tmp_path / "m.duckdb"))),
    }
    return root, instance, resources, tmp_path


def _run(instance, resources, weights, partition, assets, selection=None):
    if selection is None:  # everything given, of the vision step only uni
        selection = [key for a in assets if a is not VISION_UNI for key in a.keys] + ([UNI] if VISION_UNI in assets else [])
    return materialize(
        assets, partition_key=partition, instance=instance, raise_on_error=False,
        resources={**resources, "weights": weights}, selection=selection,
    )


def _error(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "expected a step failure"
    return user_error(failures[0].event_specific_data.error).message


def test_random_weights_run_is_recorded(env):
    root, instance, resources, tmp = env
    result = _run(instance, resources, ModelWeightsResource(allow_random=True), "demo_01", [slides.raw_slide, VISION_UNI])
    assert result.success
    stored = SpotEmbedding.load(tmp / "store" / "embeddings" / "vision_uni_standard" / "demo_01.npz")
    assert stored.info["weights"] == "random" and stored.info["config"] == "tiny"
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == emb.WEIGHTS_CHECK]
    assert not check.passed  # random weights are flagged, never hidden
    assert stored.info["patch_pass_encoders"] == ["uni"]  # only the selected encoder ran


@pytest.mark.parametrize("variant", ["standard", "freq"])
def test_one_patch_pass_for_all_encoders_equals_each_encoder_alone(env, variant):
    """The shared step (patches cut once, every encoder fed from them) stores, for each
    encoder, exactly the embedding a step of that encoder alone stores."""
    root, instance, resources, tmp = env
    weights = ModelWeightsResource(allow_random=True)
    step = emb.vision_asset_for(emb.vision_key("uni", variant))
    keys = [emb.vision_key(e, variant) for e in ("resnet50", "uni", "hipt")]  # 224 and 256 px inputs
    assert _run(instance, resources, weights, "demo_01", [slides.raw_slide, step],
                selection=[slides.RAW_SLIDE, *keys]).success
    together = {k: SpotEmbedding.load(tmp / "store" / "embeddings" / k.path[-1] / "demo_01.npz") for k in keys}
    assert together[keys[0]].info["patch_pass_encoders"] == ["resnet50", "uni", "hipt"]
    assert together[keys[2]].info["input_size"] == 256 and together[keys[0]].info["input_size"] == 224
    for key in keys:
        assert _run(instance, resources, weights, "demo_01", [slides.raw_slide, step], selection=[key]).success
        alone = SpotEmbedding.load(tmp / "store" / "embeddings" / key.path[-1] / "demo_01.npz")
        assert alone.info["patch_pass_encoders"] == [key.path[-1].split("_")[1]]
        assert alone.values.shape == together[key].values.shape
        assert (alone.values == together[key].values).all(), key


def test_no_weights_configured_names_the_setting(env):
    root, instance, resources, _ = env
    result = _run(instance, resources, ModelWeightsResource(allow_random=False, uni=""), "demo_01", [slides.raw_slide, VISION_UNI])
    assert not result.success
    message = _error(result)
    assert "slide 'demo_01'" in message and "ModelWeightsResource.uni" in message and "MIHD_UNI_WEIGHTS" in message


def test_wrong_architecture_weights_name_the_file(env):
    root, instance, resources, tmp = env
    wrong = tmp / "resnet_as_uni.pth"
    torch.save(create_encoder_model("resnet50", tiny=True).state_dict(), wrong)
    result = _run(instance, resources, ModelWeightsResource(uni=str(wrong)), "demo_01", [slides.raw_slide, VISION_UNI])
    assert not result.success
    message = _error(result)
    assert "resnet_as_uni.pth" in message and ("missing" in message or "unexpected" in message)


def test_missing_image_fails_that_slide_only(env):
    root, instance, resources, _ = env
    weights = ModelWeightsResource(allow_random=True)
    assert _run(instance, resources, weights, "demo_02", [slides.raw_slide]).success
    next((root / "demo_02").glob("*.tif")).unlink()  # image gone after raw_slide was stored
    result = _run(instance, resources, weights, "demo_02", [slides.raw_slide, VISION_UNI], selection=[UNI])
    assert not result.success
    assert "demo_02_full_image.tif" in _error(result)
    assert _run(instance, resources, weights, "demo_01", [slides.raw_slide, VISION_UNI]).success


def test_unreadable_tiff_fails_that_slide_only(env):
    root, instance, resources, _ = env
    weights = ModelWeightsResource(allow_random=True)
    assert _run(instance, resources, weights, "demo_02", [slides.raw_slide]).success
    tif = next((root / "demo_02").glob("*.tif"))
    tif.write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header with no readable image behind it
    result = _run(instance, resources, weights, "demo_02", [slides.raw_slide, VISION_UNI], selection=[UNI])
    assert not result.success
    message = _error(result)
    assert "demo_02_full_image.tif" in message and "unreadable image" in message
    assert _run(instance, resources, weights, "demo_01", [slides.raw_slide, VISION_UNI]).success


def test_slide_without_spots_fails_naming_slide_and_file(env):
    root, instance, resources, _ = env
    weights = ModelWeightsResource(allow_random=True)
    positions = next((root / "demo_02").rglob("tissue_positions*"))
    lines = positions.read_text().splitlines()
    header = [lines[0]] if lines[0].startswith("barcode") else []
    body = lines[len(header):]
    # Every spot marked off-tissue: a slide with zero spots to embed.
    rows = [",".join([f[0], "0", *f[2:]]) for f in (line.split(",") for line in body)]
    positions.write_text("\n".join(header + rows) + "\n")
    result = _run(instance, resources, weights, "demo_02", [slides.raw_slide, VISION_UNI])
    assert not result.success
    message = _error(result)
    assert "demo_02" in message and positions.name in message
    assert _run(instance, resources, weights, "demo_01", [slides.raw_slide, VISION_UNI]).success

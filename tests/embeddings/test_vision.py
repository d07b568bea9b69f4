"""Vision encoders: registry dimensions, tiny CPU builds, strict local weights, embedding."""

import logging
import re
import time

import numpy as np
import pytest
import torch
from timm.layers import GluMlp

from mihd_assets.embeddings.patches import SpotPatchDataset, make_loader
from mihd_assets.embeddings.vision import (
    ENCODERS,
    EncoderWeightsError,
    build_encoder,
    create_encoder_model,
    embed,
)
from mihd_assets.fileio import file_sha256
from mihd_assets.slides.io import read_visium_slide

FULL_DIMS = {"resnet50": 2048, "uni": 1024, "uni2": 1536, "hipt": 384}


def random_patches(n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, size, size, generator=gen) for _ in range(n)]


def run(model, size: int, n: int = 6, **kwargs):
    return embed(model, make_loader(random_patches(n, size), batch_size=4), "cpu", amp=False, **kwargs)


@pytest.mark.parametrize("name", sorted(FULL_DIMS))
def test_full_configurations_have_the_documented_width(name):
    spec = ENCODERS[name]
    assert spec.embed_dim == FULL_DIMS[name]
    with torch.device("meta"):  # shapes only: no memory for UNI2's 681M parameters
        model = create_encoder_model(name)
        out = model(torch.empty(2, 3, spec.input_size, spec.input_size))
    assert model.num_features == spec.embed_dim
    assert tuple(out.shape) == (2, spec.embed_dim)


def test_uni2_architecture_details():
    with torch.device("meta"):
        model = create_encoder_model("uni2")
    assert model.num_reg_tokens == 8 and model.has_class_token and model.no_embed_class
    assert model.patch_embed.patch_size == (14, 14) and len(model.blocks) == 24
    mlp = model.blocks[0].mlp  # timm's SwiGLUPacked is GluMlp with the gate in the first half
    assert isinstance(mlp, GluMlp) and mlp.gate_last is False and isinstance(mlp.act, torch.nn.SiLU)
    assert (mlp.fc1.out_features, mlp.fc2.in_features) == (8192, 4096)  # 1536 x 2.66667 x 2


@pytest.mark.parametrize("name", sorted(FULL_DIMS))
def test_tiny_configurations_build_and_embed(name):
    model, info = build_encoder(name, tiny=True)
    assert info["config"] == "tiny" and info["weights"] == "random" and info["weights_path"] is None
    assert info["timm_model"] == ENCODERS[name].timm_name
    assert info["embed_dim"] == model.num_features < FULL_DIMS[name]
    assert not model.training
    calls = []
    started = time.perf_counter()
    result = run(model, info["input_size"], progress_callback=lambda done, total: calls.append((done, total)))
    elapsed = time.perf_counter() - started
    assert result.embeddings.shape == (6, info["embed_dim"]) and result.embeddings.dtype == np.float32
    assert np.isfinite(result.embeddings).all()
    assert calls[-1] == (6, 6)
    # The rate is the six patches over the embedding time, which the call's wall time bounds.
    assert 0 < result.seconds <= elapsed and result.amp_dtype is None
    assert result.patches_per_second == pytest.approx(6 / result.seconds)


def test_random_weights_are_seeded():
    a, _ = build_encoder("uni", tiny=True, seed=0)
    b, _ = build_encoder("uni", tiny=True, seed=0)
    c, _ = build_encoder("uni", tiny=True, seed=1)
    ea, eb, ec = (run(m, 224).embeddings for m in (a, b, c))
    np.testing.assert_array_equal(ea, eb)
    assert not np.allclose(ea, ec)


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "weights.safetensors"])
def test_saved_weights_reload_strict_and_embed_identically(tmp_path, filename):
    original, _ = build_encoder("uni2", tiny=True, seed=7)
    path = tmp_path / filename
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(original.state_dict(), path)
    else:
        torch.save(original.state_dict(), path)
    reloaded, info = build_encoder("uni2", weights_path=path, tiny=True, seed=99)
    sha = file_sha256(path)
    assert info["weights"] == f"file:{sha[:16]}" and info["weights_sha256"] == sha
    assert info["weights_path"] == str(path.resolve())
    np.testing.assert_array_equal(run(original, 224).embeddings, run(reloaded, 224).embeddings)


def test_weights_of_another_architecture_name_file_and_keys(tmp_path):
    resnet, _ = build_encoder("resnet50", tiny=True)
    path = tmp_path / "pytorch_model.bin"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(EncoderWeightsError) as err:
        build_encoder("uni", weights_path=path, tiny=True)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys" in message and "patch_embed.proj.weight" in message
    assert "unexpected keys" in message and "conv1.0.weight" in message


def test_shape_mismatch_is_reported(tmp_path):
    uni, _ = build_encoder("uni", tiny=True)  # 224 px: 197 position embeddings
    path = tmp_path / "uni_tiny.pth"
    torch.save(uni.state_dict(), path)
    with pytest.raises(EncoderWeightsError, match=r"shape mismatches \['pos_embed: checkpoint \(1, 197, 64\) vs model \(1, 257, 64\)"):
        build_encoder("hipt", weights_path=path, tiny=True)  # 256 px: 257


def test_unusable_weights_files(tmp_path):
    missing = tmp_path / "absent.bin"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_encoder("uni", weights_path=missing, tiny=True)
    nested = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {"w": torch.zeros(1)}, "epoch": 3}, nested)
    with pytest.raises(EncoderWeightsError, match="flat state dict"):
        build_encoder("hipt", weights_path=nested, tiny=True)
    damaged = tmp_path / "damaged.bin"
    damaged.write_bytes(b"not a torch file")
    with pytest.raises(EncoderWeightsError, match=re.escape(str(damaged))):
        build_encoder("hipt", weights_path=damaged, tiny=True)
    with pytest.raises(ValueError, match="unknown vision encoder 'vit'"):
        build_encoder("vit", tiny=True)


def test_amp_off_cuda_runs_float32_and_says_so(caplog):
    model, info = build_encoder("hipt", tiny=True)
    with caplog.at_level(logging.WARNING):
        result = embed(model, make_loader(random_patches(3, 256), batch_size=2), "cpu", amp=True)
    assert result.amp_dtype is None
    assert "autocast is used only on CUDA" in caplog.text


def test_demo_slide_patches_through_resnet(tiny_slides):
    adata = read_visium_slide(tiny_slides / "demo_02")
    info = adata.uns["spatial"]["demo_02"]
    model, enc = build_encoder("resnet50", tiny=True)
    ds = SpotPatchDataset(
        info["metadata"]["image_paths"]["fullres"], adata.obsm["spatial"], 1.0,
        input_size=enc["input_size"], mean=enc["mean"], std=enc["std"],
    )
    result = embed(model, make_loader(ds, batch_size=32, num_workers=2, prefetch_factor=2), "cpu", amp=False)
    assert result.embeddings.shape == (adata.n_obs, enc["embed_dim"])
    # Different tissue gives different embeddings (a constant output would pass the shape check).
    assert result.embeddings.std(axis=0).mean() > 0

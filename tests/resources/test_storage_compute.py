import pytest

from mihd_resources.compute import ComputeResource
from mihd_resources.storage import InvalidPartitionKey, StorageResource, validate_partition_key


@pytest.mark.parametrize("key", ["151673", "demo_01", "slide-A.v2"])
def test_valid_keys(key):
    assert validate_partition_key(key) == key


@pytest.mark.parametrize("key", ["a/b", "..", "a..b", "../etc", "with space", "", "a\\b", ".hidden"])
def test_invalid_keys(key):
    with pytest.raises(InvalidPartitionKey, match="invalid partition key"):
        validate_partition_key(key)


def test_scan_refuses_invalid_folder_names(tiny_slides, tmp_path):
    import shutil

    shutil.copytree(tiny_slides / "demo_01", tmp_path / "good_1")
    shutil.copytree(tiny_slides / "demo_01", tmp_path / "bad name")
    (tmp_path / "not_a_slide").mkdir()
    valid, refused = StorageResource(slides_root=str(tmp_path)).scan_slides()
    assert valid == ["good_1"]
    assert len(refused) == 1 and "'bad name'" in refused[0]


def test_compute_device_resolution():
    import torch

    assert ComputeResource(device="cpu").torch_device() == torch.device("cpu")
    auto = ComputeResource(device="auto").torch_device()
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            ComputeResource(device="cuda").torch_device()
        assert ComputeResource(amp=True).use_amp() is False

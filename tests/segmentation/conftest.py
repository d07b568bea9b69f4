"""Fixtures shared by the segmentation tests: one torch thread, a tiny synthetic cohort."""

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny networks: one thread is faster, and immune to CPU contention from parallel runs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    from mihd_assets.demo.rosmap import generate_rosmap_demo, tiny_spec

    root = tmp_path_factory.mktemp("rosmap")
    generate_rosmap_demo(root, tiny_spec())
    return root


def write_tiff(path: Path, array: np.ndarray) -> Path:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


def changed_weights(before, after) -> int:
    """How many network tensors (not the label-diameter buffer) differ between two state dicts."""
    import torch

    a, b = torch.load(before, weights_only=True), torch.load(after, weights_only=True)
    assert a.keys() == b.keys()
    return sum(not torch.equal(a[k], b[k]) for k in a if k != "diam_labels")

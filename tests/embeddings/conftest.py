"""Fixtures shared by the embedding tests."""

import pytest

from mihd_assets.slides.io import read_visium_slide
from mihd_assets.slides.preprocess import preprocess


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is faster, and immune to CPU contention from parallel test runs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slide(tiny_slides):
    """A tiny demo slide preprocessed with the `standard` preset."""
    out, _, _ = preprocess(read_visium_slide(tiny_slides / "demo_01"), "standard")
    return out

"""benchmarks/real_dlpfc.py refuses slides it cannot score, naming the folder and the problem."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "real_dlpfc.py"


def _module():
    spec = importlib.util.spec_from_file_location("real_dlpfc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_a_slide_without_labels(tiny_slides, tmp_path):
    folder = tmp_path / "no_labels"
    shutil.copytree(tiny_slides / "demo_01", folder)
    (folder / "metadata.tsv").unlink()
    with pytest.raises(SystemExit, match=r"no_labels: no truth labels"):
        _module().check_labels(folder)


def test_refuses_labels_that_do_not_match_the_spots(tiny_slides, tmp_path):
    folder = tmp_path / "other_barcodes"
    shutil.copytree(tiny_slides / "demo_01", folder)
    table = folder / "metadata.tsv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join([lines[0]] + [f"X{line}" for line in lines[1:]]) + "\n")
    with pytest.raises(SystemExit, match=r"other_barcodes: .*(no truth labels|do not match)"):
        _module().check_labels(folder)


def test_the_real_slide_is_accepted(shared_data):
    raw, layers = _module().check_labels(shared_data / "visium_dlpfc_151676_banksy5000")
    assert raw.n_obs == 3460 and layers == 7

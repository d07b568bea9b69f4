"""The demo cohort carries the planted answer, and the E5 statistics recover it."""

import json

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from mihd_assets.demo.rosmap import NULL, PLANTED, generate_rosmap_demo
from mihd_assets.segmentation.gating import count_positive
from mihd_assets.segmentation.stats import donor_ratios, read_clinical, spearman_table
from mihd_assets.segmentation.tiles import TileReadError, discover_tiles, read_pair


def test_demo_cohort_layout_is_deterministic(tiny_cohort, tmp_path):
    truth = json.loads((tiny_cohort / "truth.json").read_text())
    donors = sorted(p.name for p in (tiny_cohort / "tiles").iterdir())
    corrupt = [d for d in donors if (tiny_cohort / "tiles" / d / truth["corrupt_tile"]).exists()]
    assert len(corrupt) == 1
    assert all(list((tiny_cohort / "tiles" / d).glob("*_metadata.xml")) for d in donors)
    clinical = read_clinical(tiny_cohort / "clinical.csv")
    assert clinical.missing_counts["braaksc"] == 1 and clinical.missing_counts["cogdx"] == 1
    from mihd_assets.demo.rosmap import tiny_spec

    again = generate_rosmap_demo(tmp_path, tiny_spec())
    first = json.loads((tiny_cohort / "manifest.json").read_text())
    assert again["spec_hash"] == first["spec_hash"]
    a = (tiny_cohort / "tiles" / donors[0] / f"{donors[0]}_GFAP_1_b0c1.tif").read_bytes()
    assert a == (tmp_path / "tiles" / donors[0] / f"{donors[0]}_GFAP_1_b0c1.tif").read_bytes()


def test_e5_statistics_recover_the_planted_associations(tmp_path):
    """Counts from a plain threshold segmentation of the default demo cohort: every planted
    outcome at FDR < 0.05, at most one null outcome."""
    root = tmp_path / "rosmap"
    generate_rosmap_demo(root)
    rows, skipped = [], 0
    for folder in sorted((root / "tiles").iterdir()):
        pairs, _ = discover_tiles(folder)
        for pair in (p for p in pairs if p.marker == "GFAP"):
            try:
                dapi, marker = read_pair(pair)
            except TileReadError:
                skipped += 1
                continue
            labels, _ = ndi.label(dapi > 700)
            n_cells, n_positive = count_positive(labels, marker, 500.0)
            rows.append({"donor_id": folder.name, "model": "threshold", "tile": pair.stem, "n_cells": n_cells, "n_positive": n_positive})
    assert skipped == 1  # the demo's corrupt marker file
    ratios = donor_ratios(pd.DataFrame(rows)).set_index("donor_id")["ratio"]
    table = spearman_table(ratios, read_clinical(root / "clinical.csv").values).set_index("outcome")
    significant = set(table.index[table["q_value"] < 0.05])
    assert set(PLANTED) <= significant, table
    assert len(significant & set(NULL)) <= 1, table
    assert table.loc["braaksc", "n_missing_outcome"] == 1 and table.loc["ceradsc", "rho"] < 0
    # The planted directions: braaksc, nft and gpath rise with the positive ratio (ceradsc falls, above).
    assert (table.loc[["braaksc", "nft", "gpath"], "rho"] > 0).all(), table

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from mihd_assets.segmentation.stats import (
    OUTCOMES,
    TileMatrix,
    bootstrap_rhos,
    bootstrap_summary,
    clean_clinical,
    donor_ratios,
    rowwise_spearman,
    spearman_table,
    subsample_ratios,
    tiles_kept,
)


def _clinical(**overrides):
    base = {"projid": ["a", "b", "c", "d"], "braaksc": ["1", "9", "4", "6"], "ceradsc": ["4", "3", "2", "1"],
            "cogdx": ["1", "", "4", "5"], "dcfdx_lv": ["1", "2", "4", "4"], "plaq_d": ["0.1", "0.5", "1", "2"],
            "plaq_n": ["0", "0.2", "0.4", "1"], "nft": ["0.1", "0.2", "3", "4"], "gpath": ["0.1", "0.3", "1.5", "2.3"]}
    base.update(overrides)
    return pd.DataFrame(base)


def test_donor_ratio_is_pooled_not_mean_of_tile_ratios():
    tiles = pd.DataFrame({
        "donor_id": ["a", "a", "a", "b"], "model": "finetuned", "tile": ["t1", "t2", "t3", "t1"],
        "n_cells": [10, 90, 0, 5], "n_positive": [9, 9, 0, 0],
    })
    ratios = donor_ratios(tiles).set_index("donor_id")
    # Hand count: donor a has 9 + 9 + 0 positive of 10 + 90 + 0 cells = 0.18 (mean of tile ratios would be 0.5).
    assert ratios.loc["a", "ratio"] == pytest.approx(18 / 100)
    assert ratios.loc["a", "n_cells"] == 100 and ratios.loc["a", "n_tiles"] == 3
    assert ratios.loc["b", "ratio"] == 0.0


def test_codebook_missing_codes_and_blanks_become_nan_and_are_counted():
    table = clean_clinical(_clinical(), "clinical.csv")
    assert np.isnan(table.values.loc["b", "braaksc"]) and np.isnan(table.values.loc["b", "cogdx"])
    assert table.missing_counts["braaksc"] == 1 and table.missing_counts["cogdx"] == 1
    assert table.values.loc["d", "braaksc"] == 6


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"cogdx": ["1", "x", "4", "5"]}, "column 'cogdx' has non-numeric value 'x' for donor b"),
        ({"ceradsc": ["4", "3", "2", "0"]}, "column 'ceradsc' has value '0' for donor d, outside the codebook"),
        ({"braaksc": ["1", "2.5", "4", "6"]}, "column 'braaksc' has value '2.5'"),
        ({"nft": ["0.1", "-1", "3", "4"]}, "column 'nft' has negative value '-1' for donor b"),
    ],
)
def test_bad_clinical_values_name_file_column_donor(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        clean_clinical(_clinical(**overrides), "clinical.csv")
    assert "clinical.csv" in str(err.value)


def test_missing_outcome_column_is_a_clear_error():
    with pytest.raises(ValueError, match=r"missing outcome column\(s\) \['gpath'\]"):
        clean_clinical(_clinical().drop(columns=["gpath"]), "clinical.csv")


def test_spearman_drops_and_counts_nan_donors_and_applies_bh():
    rng = np.random.default_rng(0)
    donors = [f"d{i}" for i in range(20)]
    ratio = pd.Series(np.linspace(0.1, 0.9, 20), index=donors)
    ratio.iloc[0] = np.nan  # a donor without cells
    clinical = pd.DataFrame({o: rng.normal(size=19) for o in OUTCOMES}, index=donors[:19])  # d19 has no clinical row
    clinical["braaksc"] = np.arange(19.0)
    clinical.loc["d5", "braaksc"] = np.nan
    clinical["cogdx"] = 3.0  # constant: no test
    table = spearman_table(ratio, clinical).set_index("outcome")
    row = table.loc["braaksc"]
    assert row["n_donors"] == 17 and row["n_dropped"] == 3
    assert row["n_no_clinical"] == 1 and row["n_missing_outcome"] == 1 and row["n_missing_ratio"] == 1
    keep = ~ratio.isna() & ratio.index.isin(clinical.index) & (ratio.index != "d5")
    expected = sps.spearmanr(ratio[keep], clinical.loc[ratio.index[keep], "braaksc"])
    assert row["rho"] == pytest.approx(expected.statistic) and row["p_value"] == pytest.approx(expected.pvalue)
    assert "constant" in table.loc["cogdx", "note"] and np.isnan(table.loc["cogdx", "q_value"])
    tested = table["p_value"].notna()
    assert np.allclose(table.loc[tested, "q_value"], sps.false_discovery_control(table.loc[tested, "p_value"], method="bh"))


def _tile_frame(rng, n_donors=15):
    rows = []
    for d in range(n_donors):
        for t in range(rng.integers(1, 8)):
            cells = int(rng.integers(0, 40))
            rows.append({"donor_id": f"d{d:02d}", "tile": f"t{t}", "n_cells": cells, "n_positive": int(rng.binomial(cells, 0.2 + 0.04 * d))})
    return pd.DataFrame(rows)


def test_bootstrap_draws_80_percent_of_each_donors_tiles_and_matches_scipy():
    rng = np.random.default_rng(1)
    tiles = _tile_frame(rng)
    matrix = TileMatrix.from_counts(tiles)
    ratios, selected = subsample_ratios(matrix, np.random.default_rng(3), 4, 0.8)
    assert (selected.sum(-1) == tiles_kept(matrix.n_tiles, 0.8)[None, :]).all()
    assert not selected[:, np.arange(selected.shape[2])[None, :] >= matrix.n_tiles[:, None]].any()
    assert list(tiles_kept(np.array([1, 2, 3, 4, 5, 10]), 0.8)) == [1, 2, 2, 3, 4, 8]
    outcome = np.random.default_rng(2).normal(size=len(matrix.donors))
    outcome[4] = np.nan
    for r in range(4):
        # Each replicate's rho equals scipy on the same drawn tiles, recomputed by hand with pandas.
        chosen = [(matrix.donors[d], t) for d in range(len(matrix.donors)) for t in range(matrix.n_tiles[d]) if selected[r, d, t]]
        drawn = pd.concat([tiles[(tiles.donor_id == d) & (tiles.tile == f"t{t}")] for d, t in chosen])
        sums = drawn.groupby("donor_id")[["n_positive", "n_cells"]].sum()
        by_hand = (sums.n_positive / sums.n_cells.where(sums.n_cells > 0)).reindex(matrix.donors).to_numpy()
        np.testing.assert_allclose(ratios[r], by_hand, equal_nan=True)
        ok = ~np.isnan(by_hand) & ~np.isnan(outcome)
        expected = sps.spearmanr(by_hand[ok], outcome[ok]).statistic
        assert rowwise_spearman(ratios[r : r + 1], outcome[None, :])[0] == pytest.approx(expected)


def test_bootstrap_summary_is_deterministic_and_bounded():
    tiles = _tile_frame(np.random.default_rng(4))
    matrix = TileMatrix.from_counts(tiles)
    outcomes = pd.DataFrame({o: np.arange(len(matrix.donors), dtype=float) for o in OUTCOMES}, index=matrix.donors)
    a = bootstrap_rhos(matrix, outcomes, 60, 0.8, seed=7, chunk=25)
    b = bootstrap_rhos(matrix, outcomes, 60, 0.8, seed=7, chunk=60)
    np.testing.assert_array_equal(a, b)
    summary = bootstrap_summary(a, np.full(len(OUTCOMES), 0.5), list(OUTCOMES))
    assert (summary["ci_low"] <= summary["rho_median"]).all() and (summary["rho_median"] <= summary["ci_high"]).all()
    assert summary["sign_consistency"].between(0, 1).all() and (summary["n_replicates"] == 60).all()

"""Cell placement's pure parts on small data whose answer is known: gene mapping, sets, joining,
metrics, the cell dataset reader, slide -> cells, and training on slides with different genes."""

from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from mihd_assets.geometry import config as geo_config
from mihd_assets.geometry.cells import CellDatasetError, CellSplit, cells_from_slide, read_cell_dataset, read_truth
from mihd_assets.geometry.encoder import fit_shared_pca
from mihd_assets.geometry.evaluate import knn_jaccard
from mihd_assets.geometry.placement import (
    FrozenEncoder,
    encode_cells,
    join_sets,
    knn_graph,
    map_genes,
    plan_sets,
    require_coverage,
)
from mihd_assets.geometry.placement_eval import evaluate_placement, knn_jaccard_all
from mihd_assets.geometry.targets import GeometryInputError


def encoder(genes, ids=None, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return FrozenEncoder(list(genes), ids, rng.normal(size=(k, len(genes))), 1.0)


# --------------------------------------------------------------------------- genes


def test_genes_are_found_by_symbol_then_ensembl_id_then_ignoring_case():
    enc = encoder(["GFAP", "MBP", "PCP4", "RELN"], ["ENSG00000131095", "ENSG00000197971", "ENSG00000183036", "ENSG00000189056"])
    # GFAP by symbol; MBP only by a versioned Ensembl id in var_names; PCP4 by a lower-case symbol
    # column; RELN absent.
    var = pd.DataFrame({"gene_symbols": ["GFAP", "x", "pcp4", "y"]},
                       index=["ENSG00000131095", "ENSG00000197971.14", "ENSG00000183036", "ENSG0000099"])
    mapping = map_genes(enc, var)
    assert mapping.columns.tolist() == [0, 1, 2, -1]
    assert mapping.matched_by == {"symbol": 1, "ensembl_id": 2, "symbol_ignoring_case": 0}
    assert mapping.missing == ["RELN"] and mapping.coverage == 0.75
    # Without the checkpoint's ids only symbols can match: GFAP (symbol column), PCP4 (its lower-case spelling).
    no_ids = map_genes(encoder(enc.genes), var)
    assert no_ids.columns.tolist() == [0, -1, 2, -1]
    assert no_ids.matched_by == {"symbol": 1, "ensembl_id": 0, "symbol_ignoring_case": 1}


def test_coverage_below_the_minimum_names_dataset_coverage_and_missing_genes():
    enc = encoder([f"G{i}" for i in range(10)])
    mapping = map_genes(enc, pd.DataFrame(index=["G0", "G1", "G2", "other"]))
    require_coverage(mapping, 0.3, "ds1", enc)  # 30% is enough at a 30% minimum
    with pytest.raises(CellDatasetError) as err:
        require_coverage(mapping, 0.8, "ds1", enc)
    message = str(err.value)
    assert "cell dataset 'ds1'" in message and "30.0%" in message and "3 of 10" in message
    assert "['G3', 'G4', 'G5'" in message and "no Ensembl ids" in message
    none = map_genes(enc, pd.DataFrame(index=["A", "B"]))
    with pytest.raises(CellDatasetError, match=r"gene coverage 0\.0%"):
        require_coverage(none, 0.0, "ds1", enc)  # no overlap at all is refused at any minimum


def test_encoding_follows_the_encoder_and_missing_genes_enter_as_zero():
    rng = np.random.default_rng(1)
    genes = ["A", "B", "C", "D"]
    enc = encoder(genes, k=2)
    counts = rng.poisson(5.0, size=(30, 4)).astype(float)
    full, empty = encode_cells(sp.csr_matrix(counts), map_genes(enc, pd.DataFrame(index=genes)), enc)
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    z = (x - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(full, z @ enc.components.T, rtol=1e-5, atol=1e-5)
    assert empty == 0
    # Gene D missing: the other three renormalised, D's column contributes nothing.
    partial, _ = encode_cells(sp.csr_matrix(counts[:, :3]), map_genes(enc, pd.DataFrame(index=genes[:3])), enc)
    x3 = np.log1p(counts[:, :3] / counts[:, :3].sum(1, keepdims=True) * 1e4)
    z3 = (x3 - x3.mean(0)) / x3.std(0)
    np.testing.assert_allclose(partial, z3 @ enc.components[:, :3].T, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_of_another_encoder_or_a_mismatched_basis_is_refused():
    good = {"kind": "shared_pca", "genes": ["A", "B"], "components": np.ones((3, 2)), "score_scale": 2.0}
    FrozenEncoder.from_checkpoint({"encoder": good, "model_config": {"in_dim": 3}}, "c.pt", "ds")
    with pytest.raises(CellDatasetError, match=r"cell dataset 'ds'.*encoder 'embedding:scgpt'"):
        FrozenEncoder.from_checkpoint({"encoder": {"kind": "embedding:scgpt"}, "model_config": {"in_dim": 3}}, "c.pt", "ds")
    with pytest.raises(CellDatasetError, match=r"does not fit its model \(input width 5\)"):
        FrozenEncoder.from_checkpoint({"encoder": good, "model_config": {"in_dim": 5}}, "c.pt", "ds")
    with pytest.raises(CellDatasetError, match="carries no frozen expression encoder"):
        FrozenEncoder.from_checkpoint({"model_config": {"in_dim": 3}}, "c.pt", "ds")


# --------------------------------------------------------------------------- sets and joining


def test_sets_cover_every_cell_once_per_pass_with_shared_anchors():
    plan = plan_sets(1000, 64, 0.5, 3, seed=0, dataset="ds")
    assert plan.set_size == 64 and plan.n_anchor == 32 and plan.passes == 3
    assert plan.n_sets == 3 * int(np.ceil((1000 - 32) / 32))
    for p in range(3):
        rows = plan.index[plan.pass_of_set == p]
        assert set(rows.ravel()) == set(range(1000))
        anchors = rows[:, :32]
        assert (anchors == anchors[0]).all()  # one anchor set per pass
        assert all(len(set(r)) == 64 for r in rows)  # no cell twice in a set
    # Twice the cells, about twice the sets: the count grows linearly.
    assert plan_sets(2000, 64, 0.5, 3, 0, "ds").n_sets == 3 * int(np.ceil((2000 - 32) / 32))


def test_fewer_cells_than_one_set_is_refused_naming_the_dataset():
    with pytest.raises(CellDatasetError, match=r"cell dataset 'small': 50 cells, fewer than one set of 64"):
        plan_sets(50, 64, 0.5, 2, 0, "small")


def _random_rigid(rng, dims=2):
    q, _ = np.linalg.qr(rng.normal(size=(dims, dims)))
    return q, rng.normal(size=dims) * 3.0


@pytest.mark.parametrize("noise", [0.0, 0.03])
def test_joining_rotated_reflected_set_estimates_recovers_the_layout(noise):
    rng = np.random.default_rng(2)
    truth = rng.uniform(-1, 1, size=(600, 2))
    plan = plan_sets(600, 48, 0.5, 2, seed=1, dataset="ds")
    coords = np.empty((plan.n_sets, plan.set_size, 2))
    for s, cells in enumerate(plan.index):
        rotation, shift = _random_rigid(rng)  # includes reflections: qr's q has determinant +-1
        coords[s] = truth[cells] @ rotation + shift + rng.normal(0, noise, size=(plan.set_size, 2))
    joined = join_sets(plan, coords, 600)
    centred = truth - truth.mean(0)
    u, _, vt = np.linalg.svd(joined.layout.T @ centred)
    error = np.sqrt(((joined.layout @ (u @ vt) - centred) ** 2).sum(1).mean())
    assert error < (1e-8 if noise == 0 else 0.05)
    assert knn_jaccard_all(joined.layout, truth, 10) > (0.999 if noise == 0 else 0.45)
    assert (joined.estimates_per_cell >= 2).all()  # at least once per pass
    if noise == 0:
        assert joined.spread.max() < 1e-8
    else:
        assert 0.01 < float(np.median(joined.spread)) < 0.06


def test_knn_graph_links_each_cell_to_its_nearest_cells():
    points = np.array([[0.0, 0], [1, 0], [0, 1], [10, 10], [11, 10], [10, 11]])
    distances, connectivities = knn_graph(points, 2)
    assert distances.shape == (6, 6) and (distances.getnnz(axis=1) == 2).all()
    assert distances[0, 1] == pytest.approx(1.0) and distances[0, 3] == 0
    assert (connectivities != connectivities.T).nnz == 0
    assert connectivities[:3, 3:].nnz == 0 and connectivities[0, 1] == 1


def test_fast_jaccard_equals_the_held_out_evaluations_definition():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(200, 2)), rng.normal(size=(200, 2))
    for k in (5, 10, 30):
        assert knn_jaccard_all(a, b, k) == pytest.approx(knn_jaccard(a, b, k), abs=1e-12)
    assert knn_jaccard_all(a, a, 10) == 1.0


def test_evaluation_scores_a_perfect_layout_above_both_baselines():
    rng = np.random.default_rng(4)
    truth = rng.uniform(size=(300, 2))
    plan = plan_sets(300, 40, 0.5, 1, 0, "ds")
    features = np.c_[truth, rng.normal(0, 0.3, size=(300, 6))]
    frame = evaluate_placement(truth * 2.0, plan.index, truth[plan.index], features, truth, max_sets=5)
    whole = frame[frame.scope == "whole"].set_index("method")
    assert whole.loc["geometry", "knn_jaccard_10"] == 1.0 and whole.loc["geometry", "trustworthiness"] == pytest.approx(1.0)
    assert whole.loc["geometry", "distance_spearman"] == pytest.approx(1.0)
    assert whole.loc["random", "knn_jaccard_10"] < 0.1
    assert whole.loc["expression_spectral", "knn_jaccard_10"] < 0.9
    assert (whole["n_cells"] == 300).all() and (whole["n_cells_pairs"] == 300).all()
    per_set = frame[frame.scope == "per_set"].set_index("method")
    assert set(per_set.index) == {"geometry", "geometry_set_estimate", "random", "expression_spectral"}
    assert (per_set["n_sets"] == 5).all() and (per_set["n_cells"] == 40).all()
    assert per_set.loc["geometry_set_estimate", "knn_jaccard_30"] == 1.0
    # More cells than max_pair_cells: Spearman and trustworthiness on a subset, said so.
    capped = evaluate_placement(truth, plan.index, truth[plan.index], features, truth, max_pair_cells=100, max_sets=2)
    assert capped.loc[capped.scope == "whole", "n_cells_pairs"].tolist() == [100, 100, 100]


# --------------------------------------------------------------------------- reading datasets


def _write(adata, path):
    adata.write_h5ad(path)
    return path


def _counts_adata(n=40, genes=("A", "B", "C"), seed=0):
    rng = np.random.default_rng(seed)
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(3.0, size=(n, len(genes))).astype(np.float32)),
                   obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=list(genes)))
    return a


def test_the_placement_reader_never_opens_obsm(tmp_path):
    a = _counts_adata()
    a.obsm["spatial_truth"] = np.arange(80, dtype=float).reshape(40, 2)
    a.obs["cell_type"] = pd.Categorical(["x", "y"] * 20)
    a.layers["counts"] = a.X.copy()
    a.X = sp.csr_matrix(np.log1p(a.X.toarray()))  # normalised X: the counts layer must win
    path = _write(a, tmp_path / "ds.h5ad")
    read = read_cell_dataset(path, "ds")
    assert len(read.obsm) == 0 and list(read.obs["cell_type"][:2]) == ["x", "y"]
    np.testing.assert_array_equal(read.X.toarray(), a.layers["counts"].toarray())
    assert read.uns["cell_dataset"]["counts_from"] == 'layers["counts"]'
    order = list(reversed(read.obs_names))
    np.testing.assert_array_equal(read_truth(path, "ds", order), a.obsm["spatial_truth"][::-1])


@pytest.mark.parametrize("problem, expected", [
    ("text", "not an AnnData file: not HDF5"),
    ("hdf5", "HDF5 without the AnnData group"),
    ("nan", "NaN or infinite count"),
    ("negative", "negative count"),
    ("fraction", "non-integer count"),
    ("empty", "the counts matrix is empty"),
])
def test_bad_dataset_files_are_refused_naming_the_dataset(tmp_path, problem, expected):
    import h5py

    path = tmp_path / "bad.h5ad"
    if problem == "text":
        path.write_text("cell,gene,count\n")
    elif problem == "hdf5":
        with h5py.File(path, "w") as fh:
            fh.create_dataset("matrix", data=np.zeros(3))
    else:
        a = _counts_adata()
        dense = a.X.toarray()
        if problem == "nan":
            dense[3, 1] = np.nan
        elif problem == "negative":
            dense[3, 1] = -2
        elif problem == "fraction":
            dense[3, 1] = 0.5
        else:
            dense = dense[:0]
            a = a[:0].copy()
        a.X = dense
        _write(a, path)
    with pytest.raises(CellDatasetError) as err:
        read_cell_dataset(path, "bad")
    assert "cell dataset 'bad'" in str(err.value) and expected in str(err.value) and str(path) in str(err.value)


def test_a_10x_h5_dataset_is_read_with_its_gene_ids(tmp_path, tiny_slides):
    import shutil

    target = tmp_path / "tenx.h5"
    shutil.copy(tiny_slides / "demo_01" / "filtered_feature_bc_matrix.h5", target)
    read = read_cell_dataset(target, "tenx")
    assert read.n_obs > 50 and "gene_ids" in read.var and read.var["gene_ids"].iloc[0].startswith("ENSGDEMO")


# --------------------------------------------------------------------------- slide -> cells


def test_cells_from_slide_divides_each_spots_counts_and_hides_positions(tiny_slides):
    from mihd_assets.slides.io import read_slide

    slide = read_slide(tiny_slides / "demo_01", "demo_01")
    spots = slide[slide.obs["in_tissue"] == 1]
    cells = cells_from_slide(slide, "demo_01", CellSplit(cells_per_spot=3, seed=5))
    assert cells.n_obs == 3 * spots.n_obs and list(cells.var_names) == list(slide.var_names)
    # The counts of a spot's cells add up to the spot's counts, gene by gene.
    per_spot = pd.DataFrame(cells.X.toarray(), index=cells.obs["source_spot"].to_numpy()).groupby(level=0).sum()
    spot_counts = spots.layers["counts"].toarray() if sp.issparse(spots.layers["counts"]) else spots.layers["counts"]
    np.testing.assert_array_equal(per_spot.loc[spots.obs_names].to_numpy(), spot_counts)
    # Positions only in obsm['spatial_truth'], each inside its spot's disc.
    assert list(cells.obsm) == ["spatial_truth"]
    centres = pd.DataFrame(spots.obsm["spatial"], index=spots.obs_names).loc[cells.obs["source_spot"]].to_numpy()
    radius = cells.uns["cells_from_slide"]["spot_radius"]
    assert np.linalg.norm(cells.obsm["spatial_truth"] - centres, axis=1).max() <= radius + 1e-9
    assert 0 < np.linalg.norm(cells.obsm["spatial_truth"] - centres, axis=1).mean() < radius
    truth = spots.obs["truth"].astype(str).to_dict()
    labels = cells.obs["cell_type"].astype(object).to_numpy()
    expected = [truth[s] for s in cells.obs["source_spot"]]
    missing = ("NA", "nan", "<NA>", "None")
    assert all((lab == exp) or (exp in missing and pd.isna(lab)) for lab, exp in zip(labels, expected))
    assert cells.obs["cell_type"].notna().mean() > 0.9
    # Shuffled: the cells of one spot are not next to each other.
    assert (cells.obs["source_spot"].to_numpy()[1:] != cells.obs["source_spot"].to_numpy()[:-1]).mean() > 0.9


# --------------------------------------------------------------------------- slides with different genes


def _slide(genes, seed, n_side=12):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n_side, 0:n_side]
    xy = np.c_[xx.ravel(), yy.ravel()].astype(float)
    rate = 2.0 + np.sin(xy[:, :1] / 3.0 + np.arange(len(genes))[None, :] * 0.1) + 1.5
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(rate).astype(np.float32)),
                   obs=pd.DataFrame(index=[f"s{seed}_{i}" for i in range(len(xy))]), var=pd.DataFrame(index=genes))
    a.var["gene_ids"] = [f"ENSG_{g}" for g in genes]
    a.obsm["spatial"] = xy * 100
    return a


def test_slides_with_different_gene_lists_train_on_the_genes_they_share():
    shared = [f"G{i:03d}" for i in range(60)]
    slides = {
        "a": _slide(shared + [f"A{i}" for i in range(40)], 0),
        "b": _slide([f"B{i}" for i in range(25)] + shared, 1),
        "c": _slide(shared[::-1] + ["C0"], 2),
    }
    enc = fit_shared_pca({k: slides[k] for k in ("a", "b")}, slides, n_genes=30, n_components=5, min_shared_genes=50)
    assert enc.n_shared_genes == 60 and enc.describe()["n_shared_genes"] == 60
    assert len(enc.genes) == 30 and set(enc.genes) <= set(shared)
    ids = dict(zip(slides["a"].var_names, slides["a"].var["gene_ids"]))
    assert enc.gene_ids == [ids[g] for g in enc.genes] and enc.state()["gene_ids"] == enc.gene_ids
    with pytest.raises(GeometryInputError) as err:
        fit_shared_pca({"a": slides["a"]}, slides, n_genes=30, n_components=5, min_shared_genes=100)
    message = str(err.value)
    assert "share only 60 genes" in message and "{'a': 100, 'b': 85, 'c': 61}" in message and "at least 100" in message


def test_the_training_set_records_how_many_genes_its_slides_share():
    from mihd_assets.geometry.dataset import build_training_set

    shared = [f"G{i:03d}" for i in range(70)]
    slides = {"a": _slide(shared + ["A0", "A1"], 0), "b": _slide(shared, 1), "c": _slide(["C0"] + shared, 2)}
    plan = geo_config.GeometryPlan(train_slides=("a", "b"), heldout_slides=("c",), pca_genes=40, pca_components=6,
                                   min_shared_genes=50)
    size = replace(geo_config.SIZES["tiny"], set_size_min=24, set_size_max=32, n_sets_train=8, n_sets_heldout=2)
    ts = build_training_set(slides, plan, size)
    assert ts.info["encoder"]["n_shared_genes"] == 70 and len(ts.encoder["genes"]) == 40
    with pytest.raises(GeometryInputError, match="share only 70 genes"):
        build_training_set(slides, replace(plan, min_shared_genes=71), size)


@pytest.mark.parametrize("key", ["../x", "a/b", "/abs", ".hidden", "two words"])
def test_cell_dataset_keys_that_are_not_file_names_are_refused(key, tmp_path, monkeypatch):
    from mihd_assets.geometry.cell_datasets import cell_dataset_source
    from mihd_assets.geometry.placement_assets import placement_file
    from mihd_resources.geometry_store import GeometryStore
    from mihd_resources.storage import InvalidPartitionKey

    monkeypatch.setenv("MIHD_CELLS_ROOT", str(tmp_path / "cells"))
    with pytest.raises(InvalidPartitionKey, match="of partitions 'cell_datasets'"):
        cell_dataset_source(key)
    with pytest.raises(InvalidPartitionKey, match="of partitions 'cell_datasets'"):
        placement_file(GeometryStore(base_dir=str(tmp_path / "store")), key, ".h5ad")
    assert not (tmp_path / "store").exists()


def test_a_10x_mtx_folder_is_a_dataset_the_scan_finds_and_the_reader_reads(tmp_path):
    from scipy.io import mmwrite

    from mihd_assets.geometry.cells import scan_cell_datasets

    rng = np.random.default_rng(6)
    counts = rng.poisson(2.0, size=(30, 5))
    folder = tmp_path / "pbmc" / "filtered_feature_bc_matrix"
    folder.mkdir(parents=True)
    mmwrite(str(folder / "matrix.mtx"), sp.coo_matrix(counts.T))  # 10x stores genes x cells
    (folder / "genes.tsv").write_text("".join(f"ENSG{i:011d}\tGENE{i}\n" for i in range(5)))
    (folder / "barcodes.tsv").write_text("".join(f"CELL{i}-1\n" for i in range(30)))
    (tmp_path / "notes").mkdir()  # a folder without a matrix is not a dataset
    assert scan_cell_datasets(tmp_path, lambda key: key) == (["pbmc"], [])
    read = read_cell_dataset(tmp_path / "pbmc", "pbmc")
    assert list(read.var_names) == [f"GENE{i}" for i in range(5)] and read.var["gene_ids"].iloc[2] == "ENSG00000000002"
    np.testing.assert_array_equal(read.X.toarray(), counts)

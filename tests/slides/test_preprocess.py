"""Preprocessing presets: explicit order, raw counts kept, overrides recorded."""

import numpy as np
import pytest
import scanpy as sc

from mihd_assets.slides.io import read_visium_slide
from mihd_assets.slides.preprocess import PreprocessError, preprocess


@pytest.fixture(scope="module")
def raw(tiny_slides):
    return read_visium_slide(tiny_slides / "demo_01")


def test_staig_preset_matches_reference_order(raw):
    out, ran, _ = preprocess(raw, "staig")
    assert [s.split("(")[0] for s in ran] == [
        "filter_genes", "highly_variable_genes", "normalize_total", "log1p", "scale", "subset_highly_variable",
    ]
    assert "flavor=seurat_v3" in ran[1] and "zero_center=False" in ran[4] and "max_value=10.0" in ran[4]
    # Same result as running STAIG's order by hand with scanpy.
    ref = raw.copy()
    sc.pp.filter_genes(ref, min_cells=1)
    sc.pp.highly_variable_genes(ref, flavor="seurat_v3", n_top_genes=min(3000, ref.n_vars))
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    ref.X = ref.X.toarray()
    sc.pp.scale(ref, zero_center=False, max_value=10)
    ref = ref[:, ref.var["highly_variable"]]
    assert list(out.var_names) == list(ref.var_names)
    np.testing.assert_allclose(out.X, ref.X, rtol=1e-5, atol=1e-6)
    # No centring (zero counts stay exactly 0), and the clip at 10 is reached on this slide.
    assert out.X.min() == 0 and out.X.max() == 10


def test_raw_counts_kept_and_steps_recorded(raw):
    out, ran, notes = preprocess(raw, "standard")
    assert out.uns["preprocess"]["preset"] == "standard"
    assert list(out.uns["preprocess"]["steps"]) == ran
    counts = out.layers["counts"]
    assert np.allclose(counts.data, np.round(counts.data))
    # Fewer genes than n_top_genes is said, not hidden.
    assert any("n_top_genes 3000" in n for n in notes)
    assert abs(float(np.asarray(out.X).mean())) < 1e-4  # zero-centred


def test_override_changes_order_and_is_flagged(raw):
    out, ran, _ = preprocess(raw, "staig", ["normalize_total", "log1p", "highly_variable_genes", "subset_highly_variable"])
    assert [s.split("(")[0] for s in ran] == ["normalize_total", "log1p", "highly_variable_genes", "subset_highly_variable"]
    assert out.uns["preprocess"]["override"] is True


def test_unknown_preset_and_step(raw):
    with pytest.raises(PreprocessError, match="unknown preset 'nope'"):
        preprocess(raw, "nope")
    with pytest.raises(PreprocessError, match="unknown preprocessing step 'magic'"):
        preprocess(raw, "standard", ["magic"])


def test_non_integer_counts_rejected(raw):
    bad = raw.copy()
    bad.layers["counts"] = bad.layers["counts"] * 0.5
    with pytest.raises(PreprocessError, match="non-negative integer counts"):
        preprocess(bad, "staig")


def _counts_with_rare_high_expresser(n_obs=300, n_vars=60, seed=0):
    """Poisson counts plus one gene expressed in only two spots, strongly: its z-scores
    there exceed 10, where a max_value=10 clip would rewrite them."""
    import anndata as ad
    import scipy.sparse as sparse

    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(2.0, 2.0, size=n_vars), size=(n_obs, n_vars)).astype(np.float32)
    counts[:, 0] = 0
    counts[[5, 17], 0] = 40
    adata = ad.AnnData(sparse.csr_matrix(counts))
    adata.var_names = [f"g{i}" for i in range(n_vars)]
    adata.obs_names = [f"s{i}" for i in range(n_obs)]
    return adata


def test_standard_preset_is_scanpys_textbook_pipeline_without_clipping():
    raw = _counts_with_rare_high_expresser()
    out, ran, _ = preprocess(raw, "standard")
    assert [s.split("(")[0] for s in ran] == [
        "filter_genes", "highly_variable_genes", "normalize_total", "log1p", "subset_highly_variable", "scale",
    ]
    assert ran[-1] == "scale(max_value=None, zero_center=True)"
    assert list(out.uns["preprocess"]["steps"]) == ran
    ref = raw.copy()
    sc.pp.highly_variable_genes(ref, flavor="seurat_v3", n_top_genes=min(3000, ref.n_vars))
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    ref = ref[:, ref.var["highly_variable"].to_numpy()].copy()
    sc.pp.scale(ref)
    assert list(out.var_names) == list(ref.var_names)
    np.testing.assert_allclose(out.X, ref.X, rtol=1e-4, atol=1e-4)
    # The rare high expresser keeps its z-scores above 10 (no clip at max_value=10).
    assert float(np.asarray(out[:, "g0"].X).max()) > 10

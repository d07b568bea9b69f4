"""The platform's gene-only path vs scanpy's textbook pipeline on one labelled slide.

    .venv/bin/python benchmarks/gene_path_vs_textbook.py SLIDE_FOLDER [--seeds 5]

Platform: ``preprocess(raw, MATRIX.gene_preset)`` -> ``pca_embedding(n_components=
MATRIX.pca_components)`` -> ``prepare_for_clustering`` (as the gene_pca clustering assets
call it) -> mclust EEE / k-means. Textbook: ``sc.pp.highly_variable_genes(flavor=
"seurat_v3", n_top_genes=3000)`` on raw counts -> ``normalize_total(1e4)`` -> ``log1p`` ->
subset to the HVGs -> ``scale`` -> ``sc.tl.pca(n_comps=30)`` -> the same clustering. Both
get the same number of clusters (the number of truth labels unless ``--n-clusters``).

Seed s (0..seeds-1) is the PCA ``random_state`` (used by randomized or ARPACK solvers), R's
``set.seed`` before Mclust (its hierarchical initialisation runs on a random subset of 2,000
spots when there are more) and the k-means ``random_state``. Printed: ARI and NMI mean and
sd (ddof=1) over the seeds, on the labelled spots, raw and after the platform's 15-nearest-
spot majority vote (``refine_labels``), plus the mean cosine of the principal angles
between each path's PCA subspace and the exact (LAPACK) PCA subspace of the textbook matrix.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def platform_embedding(raw, seed: int) -> tuple[np.ndarray, str]:
    from mihd_assets.embeddings.gene import pca_embedding
    from mihd_assets.fusion.clustering import prepare_for_clustering
    from mihd_assets.matrix import MATRIX
    from mihd_assets.slides.preprocess import preprocess

    pre, ran, _ = preprocess(raw, MATRIX.gene_preset)
    emb, info = pca_embedding(pre, n_components=MATRIX.pca_components, seed=seed)
    x, how = prepare_for_clustering(emb, standardize_first=False, max_dims=MATRIX.max_cluster_dims,
                                    n_pcs=MATRIX.cluster_pcs, seed=seed)
    return x, " -> ".join(ran) + f" -> pca{info['n_components']}({info['svd_solver']}) -> {how}"


def textbook_matrix(raw):
    """The scaled 3,000-HVG matrix of the textbook pipeline (dense float32)."""
    import scanpy as sc

    ad = raw.copy()
    sc.pp.highly_variable_genes(ad, flavor="seurat_v3", n_top_genes=3000)
    sc.pp.normalize_total(ad, target_sum=1e4)
    sc.pp.log1p(ad)
    ad = ad[:, ad.var["highly_variable"].to_numpy()].copy()
    sc.pp.scale(ad)
    return ad


def textbook_embedding(scaled, seed: int) -> tuple[np.ndarray, str]:
    import scanpy as sc

    ad = scaled.copy()
    sc.tl.pca(ad, n_comps=30, random_state=seed)
    return np.asarray(ad.obsm["X_pca"]), "scanpy HVG seurat_v3 3000 -> normalize_total -> log1p -> subset -> scale -> pca30"


def subspace_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine of the principal angles between the column spaces of two centred embeddings."""
    qa, _ = np.linalg.qr(a - a.mean(axis=0))
    qb, _ = np.linalg.qr(b - b.mean(axis=0))
    return float(np.linalg.svd(qa.T @ qb, compute_uv=False).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slide", type=Path, help="a Visium slide folder with truth labels (e.g. metadata.tsv)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n-clusters", type=int, default=None, help="default: the number of truth labels")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)

    from sklearn.decomposition import PCA

    from mihd_assets.fusion.clustering import kmeans_labels, mclust_labels, refine_labels
    from mihd_assets.fusion.metrics import agreement
    from mihd_assets.slides.io import read_visium_slide

    raw = read_visium_slide(args.slide)
    if "truth" not in raw.obs:
        parser.error(f"{args.slide}: no truth labels")
    truth = raw.obs["truth"].astype(object).to_numpy()
    known = np.array([t is not None and str(t) != "nan" for t in truth])
    k = args.n_clusters or len(set(np.asarray(truth[known], dtype=str)))
    coords = np.asarray(raw.obsm["spatial"], dtype=np.float64)
    print(f"{args.slide}: {raw.n_obs} spots x {raw.n_vars} genes, {int(known.sum())} labelled, k={k}, "
          f"seeds 0..{args.seeds - 1}")

    scaled = textbook_matrix(raw)
    exact = PCA(n_components=30, svd_solver="full").fit_transform(np.asarray(scaled.X, dtype=np.float64))
    paths = {"platform": lambda s: platform_embedding(raw, s), "textbook": lambda s: textbook_embedding(scaled, s)}
    rows = []
    for name, embed in paths.items():
        scores: dict[str, list[float]] = {}
        cosines = []
        start = time.perf_counter()
        for seed in range(args.seeds):
            x, how = embed(seed)
            cosines.append(subspace_cosine(x, exact))
            for method, labels in (("mclust", mclust_labels(x, k, "EEE", seed=seed)),
                                   ("kmeans", kmeans_labels(x, k, seed=seed))):
                for refine, lab in (("raw", labels), ("vote15", refine_labels(labels, coords, k=15))):
                    a = agreement(truth, lab)
                    scores.setdefault(f"{method} {refine} ARI", []).append(a["ari"])
                    scores.setdefault(f"{method} {refine} NMI", []).append(a["nmi"])
        print(f"\n{name}: {how}\n  PCA subspace vs exact: mean principal cosine {np.mean(cosines):.3f}; "
              f"{time.perf_counter() - start:.0f} s")
        rows.append((name, scores))

    print("\n| metric | " + " | ".join(n for n, _ in rows) + " |\n|---|" + "---|" * len(rows))
    for metric in rows[0][1]:
        cells = [f"{np.mean(s[metric]):.3f} ± {np.std(s[metric], ddof=1) if len(s[metric]) > 1 else 0.0:.3f}"
                 for _, s in rows]
        print(f"| {metric} | " + " | ".join(cells) + " |")
    print("\nper seed (mclust vote15 ARI): " + "; ".join(
        f"{n} " + " ".join(f"{v:.3f}" for v in s["mclust vote15 ARI"]) for n, s in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

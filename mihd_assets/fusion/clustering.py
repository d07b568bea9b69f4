"""Clustering of spot embeddings: R mclust (default), k-means, Leiden; spatial refinement.

Inputs are validated before they reach R (2-D, finite, no empty dimension, at least as
many rows as clusters; errors name the shape): otherwise mclust fails from inside R with
``svd(data, nu=0): a dimension is zero`` and no hint of which matrix was wrong.
"""

from __future__ import annotations

import logging

import numpy as np

_log = logging.getLogger(__name__)


class ClusteringInputError(ValueError):
    """The matrix handed to a clustering method cannot be clustered as asked."""


class MclustUnavailable(RuntimeError):
    """R, rpy2 or the mclust package is missing."""


MCLUST_INSTALL = (
    "install R and mclust (Debian/Ubuntu: `apt-get install r-base-core r-cran-mclust`, or "
    "`bash scripts/install_system_deps.sh`; elsewhere: R's install.packages('mclust')) and "
    "rpy2 3.5.x (`pip install 'rpy2>=3.5.17,<3.6'`)"
)


def validate_for_clustering(values: np.ndarray, n_clusters: int, where: str) -> np.ndarray:
    """A 2-D finite float64 matrix with at least ``n_clusters`` rows and no empty dimension."""
    x = np.asarray(values)
    if x.ndim != 2:
        raise ClusteringInputError(f"{where}: expected a 2-D (spots x dims) matrix, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ClusteringInputError(f"{where}: matrix of shape {x.shape} has an empty dimension")
    if n_clusters < 1:
        raise ClusteringInputError(f"{where}: number of clusters must be >= 1, got {n_clusters}")
    if x.shape[0] < n_clusters:
        raise ClusteringInputError(f"{where}: {x.shape[0]} spots (shape {x.shape}) but {n_clusters} clusters requested")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ClusteringInputError(f"{where}: {bad} of {x.shape[0]} rows of the {x.shape} matrix have NaN/inf values")
    if not (x.std(axis=0) > 0).any():
        raise ClusteringInputError(f"{where}: every column of the {x.shape} matrix is constant")
    return x.astype(np.float64)


def prepare_for_clustering(values: np.ndarray, standardize_first: bool, max_dims: int, n_pcs: int,
                           seed: int = 0) -> tuple[np.ndarray, str]:
    """What a clustering method sees, and how it was derived (to be recorded).

    Gene embeddings are used as stored (the textbook PCA -> mclust path); vision embeddings
    get their one standardization (``standardize_first``); fusion outputs are used as
    produced. Anything wider than ``max_dims`` is reduced to ``n_pcs`` principal components
    (mclust's EEE covariance is singular on ~1,000-d inputs), by exact (ARPACK) PCA:
    sklearn's automatic choice, randomized SVD, recovers only the leading components of a
    flat spectrum and makes the result depend on the seed. Gene PCA embeddings (30 dims)
    pass unchanged: no second standardization or PCA on top of the textbook path."""
    from sklearn.decomposition import PCA

    from . import normalize

    steps = []
    x = np.asarray(values, dtype=np.float32)
    if standardize_first:
        x = normalize.standardize(x)
        steps.append("standardize")
    if x.shape[1] > max_dims:
        n = min(n_pcs, min(x.shape) - 1)  # ARPACK needs fewer components than either side
        x = PCA(n_components=n, svd_solver="arpack", random_state=seed).fit_transform(x).astype(np.float32)
        steps.append(f"pca{n} (arpack) of {values.shape[1]} dims")
    return x, " -> ".join(steps) or f"as stored ({x.shape[1]} dims)"


def _import_robjects():
    """``rpy2.robjects``, without leaving R's library path in this process's environment.

    Embedding R sets ``LD_LIBRARY_PATH`` (R's lib folder, then the system's) in ``os.environ``.
    R has loaded its libraries by then; the variable only reaches child processes, where it
    makes another Python load the system's OpenSSL (``import ssl`` then fails) - every later
    subprocess, Slurm job (``sbatch --export=ALL``) or spawned worker of the step would break.
    """
    import os

    before = os.environ.get("LD_LIBRARY_PATH")
    import rpy2.robjects as ro

    if before is None:
        os.environ.pop("LD_LIBRARY_PATH", None)
    else:
        os.environ["LD_LIBRARY_PATH"] = before
    return ro


def mclust_available() -> tuple[bool, str]:
    """Whether R, rpy2 and mclust can be used here, and why not."""
    try:
        ro = _import_robjects()
    except Exception as exc:  # rpy2 missing, or R's shared library not found
        return False, f"rpy2/R not usable ({type(exc).__name__}: {exc})"
    # system.file instead of rpy2's isinstalled, which makes R warn about every empty library folder
    if not ro.r('nzchar(system.file(package = "mclust"))')[0]:
        return False, f"R ({ro.r('R.version.string')[0]}) has no mclust package"
    return True, ""


def mclust_labels(values: np.ndarray, n_clusters: int, model_name: str = "EEE", seed: int = 2020,
                  where: str = "mclust") -> np.ndarray:
    """``Mclust(X, G=n_clusters, modelNames=model_name)`` after ``set.seed(seed)``; labels 0..G-1."""
    x = validate_for_clustering(values, n_clusters, where)
    ok, why = mclust_available()
    if not ok:
        raise MclustUnavailable(f"{where}: R mclust is not available: {why}. To fix: {MCLUST_INSTALL}")
    import rpy2.robjects as ro
    from rpy2.robjects import numpy2ri
    from rpy2.robjects.conversion import localconverter

    # lib.loc = mclust's own library: R warns about every empty library folder on the path
    # (Debian ships an empty /usr/local/lib/R/site-library), once per call otherwise.
    ro.r('suppressPackageStartupMessages(library(mclust, lib.loc = dirname(find.package("mclust"))))')
    ro.r["set.seed"](seed)
    with localconverter(ro.default_converter + numpy2ri.converter):
        r_x = ro.conversion.get_conversion().py2rpy(x)
    result = ro.r["Mclust"](r_x, G=n_clusters, modelNames=model_name, verbose=False)
    if result is ro.NULL or not hasattr(result, "rx2"):
        raise RuntimeError(
            f"{where}: Mclust returned no model for G={n_clusters}, model {model_name} on a {x.shape} matrix "
            "(singular covariance: too many dimensions for the number of spots?)"
        )
    classification = np.asarray(result.rx2("classification"), dtype=np.int64)
    if classification.shape[0] != x.shape[0]:
        raise RuntimeError(f"{where}: Mclust returned {classification.shape[0]} labels for {x.shape[0]} spots")
    return classification - 1


def kmeans_labels(values: np.ndarray, n_clusters: int, seed: int = 0, where: str = "kmeans") -> np.ndarray:
    from sklearn.cluster import KMeans

    x = validate_for_clustering(values, n_clusters, where)
    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x).astype(np.int64)


def clusters_found(labels: np.ndarray) -> int:
    """How many clusters hold at least one spot."""
    return int(np.unique(np.asarray(labels)).size)


def cluster_count_facts(labels: np.ndarray, requested: int, method: str, where: str, logger=None) -> dict:
    """``n_clusters_requested`` and ``n_clusters_found`` of one clustering; a WARNING when they differ.

    mclust can leave mixture components without a spot, and k-means can leave a centroid
    without one on duplicated points: the labels then hold fewer clusters than asked for."""
    found = clusters_found(labels)
    if found != requested:
        (logger or _log).warning(f"{where}: {method} returned {found} non-empty clusters, {requested} were requested; "
                              "n_clusters_found is recorded and the clustering_method_as_requested check fails")
    return {"n_clusters_requested": int(requested), "n_clusters_found": found}


def leiden_labels(values: np.ndarray, n_clusters: int, seed: int = 0, n_neighbors: int = 15,
                  where: str = "leiden", logger=None) -> tuple[np.ndarray, dict]:
    """Leiden on the k-NN graph of the embedding, resolution bisected until it yields
    ``n_clusters`` communities (the usual way to compare it with fixed-K methods).

    When 40 bisection steps find no resolution giving exactly ``n_clusters``, the partition
    closest to it is returned, a WARNING is logged (``logger``, else this module's logger), and
    ``info`` says so: ``n_found`` (the clusters it has) and ``resolution_search`` =
    ``"closest"`` (``"exact"`` when the count was hit)."""
    import igraph as ig
    import leidenalg
    from sklearn.neighbors import kneighbors_graph

    x = validate_for_clustering(values, n_clusters, where)
    graph = kneighbors_graph(x, n_neighbors=min(n_neighbors, x.shape[0] - 1), mode="connectivity")
    graph = graph.maximum(graph.T).tocoo()
    keep = graph.row < graph.col
    g = ig.Graph(n=x.shape[0], edges=list(zip(graph.row[keep].tolist(), graph.col[keep].tolist())))

    def run(resolution: float) -> np.ndarray:
        part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition,
                                        resolution_parameter=resolution, seed=seed)
        return np.asarray(part.membership, dtype=np.int64)

    low, high = 0.01, 5.0
    best, best_res = run(1.0), 1.0
    for _ in range(40):
        if clusters_found(best) == n_clusters:
            break
        mid = (low + high) / 2
        labels = run(mid)
        found = clusters_found(labels)
        if abs(found - n_clusters) < abs(clusters_found(best) - n_clusters):
            best, best_res = labels, mid
        if found < n_clusters:
            low = mid
        else:
            high = mid
    found = clusters_found(best)
    if found != n_clusters:
        (logger or _log).warning(
            f"{where}: leiden's resolution search (0.01 to 5.0, 40 bisections) found no partition with "
            f"{n_clusters} clusters; using the closest, {found} clusters at resolution {best_res:.5f}")
    return best, {"resolution": round(best_res, 5), "n_found": found,
                  "resolution_search": "exact" if found == n_clusters else "closest"}


def refine_labels(labels: np.ndarray, coords: np.ndarray, k: int = 15) -> np.ndarray:
    """Majority vote of each spot's ``k`` nearest other spots (ties keep the spot's own label
    when it is among the most frequent, else the smallest label)."""
    from sklearn.neighbors import NearestNeighbors

    labels = np.asarray(labels, dtype=np.int64)
    coords = np.asarray(coords, dtype=np.float64)
    if coords.shape != (labels.shape[0], 2):
        raise ClusteringInputError(f"refinement: coordinates of shape {coords.shape} for {labels.shape[0]} labels")
    k = min(k, labels.shape[0] - 1)
    if k < 1:
        return labels.copy()
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords)
    neighbour_labels = labels[idx[:, 1:]]
    n_labels = int(labels.max()) + 1
    counts = np.zeros((labels.shape[0], n_labels), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(labels.shape[0]), k), neighbour_labels.ravel()), 1)
    top = counts.max(axis=1)
    own_is_top = counts[np.arange(labels.shape[0]), labels] == top
    return np.where(own_is_top, labels, counts.argmax(axis=1))

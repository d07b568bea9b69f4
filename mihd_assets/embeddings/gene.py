"""Gene-expression embeddings of spots: PCA and a small per-slide MLP autoencoder.

Both take a preprocessed AnnData (``X`` = the processed HVG matrix) and return the raw
embedding, float32 ``(n_spots, d)``, with an info dict for the asset's metadata.
Embeddings are stored raw: any scaling or L2 normalisation happens after loading, in one
place (standardising twice silently changes results).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)


class GeneEmbeddingInputError(ValueError):
    """The expression matrix cannot be embedded; the message gives its shape and the problem."""


def expression_matrix(adata: ad.AnnData, what: str) -> np.ndarray:
    """``adata.X`` as a dense float32 array, checked: 2-D, non-empty, finite."""
    X = adata.X
    if X is None:
        raise GeneEmbeddingInputError(f"{what}: adata.X is None (shape {adata.shape})")
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    if X.ndim != 2:
        raise GeneEmbeddingInputError(f"{what}: expected a 2-D spots x genes matrix, got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise GeneEmbeddingInputError(f"{what}: empty expression matrix of shape {X.shape} (spots x genes)")
    X = X.astype(np.float32, copy=False)
    finite = np.isfinite(X)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise GeneEmbeddingInputError(
            f"{what}: {int((~finite).sum())} non-finite values in matrix of shape {X.shape} "
            f"(first spots: {bad_rows[:5].tolist()})"
        )
    return X


PCA_SOLVER = "arpack"


def pca_embedding(adata: ad.AnnData, n_components: int = 50, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Exact PCA of ``adata.X`` (centred by PCA itself; no further scaling).

    The solver is ARPACK (``PCA_SOLVER``), scanpy's default for dense data, so the
    embedding equals ``sc.tl.pca``'s. sklearn's ``svd_solver="auto"`` picks randomized SVD
    for matrices above 500 x 500 when fewer than 80% of the components are asked for; on
    a spot x 3,000-HVG matrix the spectrum is flat (30 PCs explain 6% of the variance of
    spatialLIBD 151676), and randomized SVD's 7 power iterations recover only the leading
    PCs: the 30-PC subspace's mean principal-angle cosine to the exact one was 0.70, and
    it changed with the seed. ``seed`` only sets ARPACK's start vector (the subspace does
    not depend on it).

    ``n_components`` is clamped to ``min(n_spots, n_genes) - 1`` (the most PCA can give
    without a degenerate component, and ARPACK's limit); the clamp is reported in the info,
    never hidden.
    """
    from sklearn.decomposition import PCA

    if n_components < 1:
        raise GeneEmbeddingInputError(f"pca_embedding: n_components must be >= 1, got {n_components}")
    X = expression_matrix(adata, "pca_embedding")
    limit = min(X.shape) - 1
    if limit < 1:
        raise GeneEmbeddingInputError(f"pca_embedding: matrix of shape {X.shape} is too small for PCA (needs >= 2 x 2)")
    used = min(n_components, limit)
    start = time.perf_counter()
    pca = PCA(n_components=used, svd_solver=PCA_SOLVER, random_state=seed)
    emb = pca.fit_transform(X).astype(np.float32)
    ratio = pca.explained_variance_ratio_
    info = {
        "method": "pca",
        "svd_solver": PCA_SOLVER,
        "input_shape": list(X.shape),
        "n_components_requested": int(n_components),
        "n_components": int(used),
        "clamped": used != n_components,
        "clamp_reason": f"min(n_spots, n_genes) - 1 = {limit}" if used != n_components else None,
        "explained_variance_ratio": [float(r) for r in ratio],
        "explained_variance_total": float(ratio.sum()),
        "seed": int(seed),
        "seconds": time.perf_counter() - start,
        "normalization": "none (raw PCA scores)",
    }
    return emb, info


def _autoencoder(n_in: int, hidden: Sequence[int], latent_dim: int):
    from torch import nn

    def mlp(sizes: list[int]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:  # no activation on the bottleneck or the reconstruction
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    encoder = mlp([n_in, *hidden, latent_dim])
    decoder = mlp([latent_dim, *reversed(hidden), n_in])
    return encoder, decoder


def mlp_autoencoder_embedding(
    adata: ad.AnnData,
    latent_dim: int = 32,
    hidden: Sequence[int] = (256,),
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 256,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Train a small MLP autoencoder on one slide's ``adata.X`` (MSE) and return its bottleneck.

    Deterministic for a given seed on CPU: initialisation and shuffling draw from a forked
    RNG seeded with ``seed``, so the caller's global torch RNG state is left untouched.
    """
    import torch
    from torch import nn

    if latent_dim < 1 or epochs < 1 or batch_size < 1 or lr <= 0:
        raise GeneEmbeddingInputError(
            f"mlp_autoencoder_embedding: need latent_dim, epochs, batch_size >= 1 and lr > 0; "
            f"got latent_dim={latent_dim}, epochs={epochs}, batch_size={batch_size}, lr={lr}"
        )
    if any(h < 1 for h in hidden):
        raise GeneEmbeddingInputError(f"mlp_autoencoder_embedding: hidden sizes must be >= 1, got {list(hidden)}")
    X_np = expression_matrix(adata, "mlp_autoencoder_embedding")
    dev = torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        encoder, decoder = _autoencoder(X_np.shape[1], hidden, latent_dim)
        encoder.to(dev)
        decoder.to(dev)
        X = torch.from_numpy(X_np).to(dev)
        params = [*encoder.parameters(), *decoder.parameters()]
        optimizer = torch.optim.Adam(params, lr=lr)
        loss_fn = nn.MSELoss()
        shuffle = torch.Generator().manual_seed(seed)
        n = X.shape[0]
        history: list[float] = []
        encoder.train()
        decoder.train()
        report_every = max(1, epochs // 10)
        for epoch in range(epochs):
            order = torch.randperm(n, generator=shuffle).to(dev)
            total = torch.zeros((), device=dev)  # summed on the device: no host sync per step
            for i in range(0, n, batch_size):
                batch = X[order[i : i + batch_size]]
                loss = loss_fn(decoder(encoder(batch)), batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * batch.shape[0]
            history.append(float(total) / n)
            if (epoch + 1) % report_every == 0:
                log.info("MLP autoencoder: epoch %d/%d, loss %.4f", epoch + 1, epochs, history[-1])
        encoder.eval()
        with torch.no_grad():
            emb = encoder(X).cpu().numpy().astype(np.float32)
    seconds = time.perf_counter() - start
    info = {
        "method": "mlp_autoencoder",
        "input_shape": list(X_np.shape),
        "latent_dim": int(latent_dim),
        "hidden": [int(h) for h in hidden],
        "epochs": int(epochs),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "device": str(dev),
        "n_parameters": int(sum(p.numel() for p in params)),
        "initial_loss": history[0],
        "final_loss": history[-1],
        "loss_history": history,
        "seconds": seconds,
        "normalization": "none (raw bottleneck activations)",
    }
    return emb, info

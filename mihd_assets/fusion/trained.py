"""Trained fusion of a gene and a vision spot embedding: LLaVA-style MLP projector,
two-tower contrastive alignment, and a BLIP-2-style Q-Former.

Each function takes the two embeddings of one slide (n_spots x d_gene, n_spots x d_vision)
and returns ``(fused, info)``: the fused embedding as float32 ``(n_spots, d_fused)`` and an
info dict for the asset's metadata (method, epochs, final_loss, loss_history, seconds,
device, dims and every hyperparameter used).

The inputs arrive already standardised per modality by the caller: that is the one
normalization (standardising twice silently changes results). Nothing here standardises,
scales or reduces them again, and the caller's arrays are never modified.

Training is mini-batched (a real slide has about 3,600 spots), on the device given, and
deterministic for a seed on CPU: initialisation draws from a forked torch RNG seeded with
``seed`` (the caller's global RNG state is left untouched) and shuffling from a dedicated
generator. The per-epoch loss is accumulated on the device and read once per epoch; an
optional ``progress(epoch, epochs, loss)`` callback is called after every epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import info_nce

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float], None]


class FusionInputError(ValueError):
    """An embedding or a hyperparameter cannot be used; the message names the shape or value."""


def check_embedding(what: str, x: np.ndarray, *, min_rows: int = 2) -> np.ndarray:
    """``x`` as a float32 array after checking it is 2-D, non-empty, finite, with >= ``min_rows`` rows.

    Returns a new array when a dtype conversion is needed, otherwise ``x`` itself; callers
    only read it.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise FusionInputError(f"{what}: expected a 2-D (n_spots, d) array, got shape {arr.shape}")
    if arr.shape[0] < min_rows or arr.shape[1] == 0:
        raise FusionInputError(f"{what}: need >= {min_rows} rows and >= 1 column, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise FusionInputError(f"{what}: expected a real numeric array, got dtype {arr.dtype} (shape {arr.shape})")
    arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise FusionInputError(
            f"{what}: {int((~finite).sum())} non-finite values in array of shape {arr.shape} "
            f"(first rows: {bad_rows[:5].tolist()})"
        )
    return arr


def check_pair(method: str, gene: np.ndarray, vision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both embeddings checked and with the same number of spots (rows)."""
    gene_arr = check_embedding(f"{method}: gene embedding", gene)
    vision_arr = check_embedding(f"{method}: vision embedding", vision)
    if gene_arr.shape[0] != vision_arr.shape[0]:
        raise FusionInputError(
            f"{method}: gene embedding has shape {gene_arr.shape} and vision embedding {vision_arr.shape}: "
            "the row (spot) counts must match"
        )
    return gene_arr, vision_arr


def check_hyperparameters(method: str, *, positive_ints: Mapping[str, int] | None = None,
                          positive_floats: Mapping[str, float] | None = None,
                          non_negative_floats: Mapping[str, float] | None = None) -> None:
    """Raise naming every hyperparameter outside its range."""
    bad = [f"{k}={v!r} (needs an int >= 1)" for k, v in (positive_ints or {}).items()
           if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1]
    bad += [f"{k}={v!r} (needs > 0)" for k, v in (positive_floats or {}).items() if not (math.isfinite(v) and v > 0)]
    bad += [f"{k}={v!r} (needs >= 0)" for k, v in (non_negative_floats or {}).items()
            if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise FusionInputError(f"{method}: invalid hyperparameters: {', '.join(bad)}")


@contextlib.contextmanager
def training_context(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Seeded, float32 training: yields a CPU generator for shuffling and sampling.

    torch is seeded inside a forked RNG state (the caller's stays untouched). Autocast is
    switched off for the device: these small networks train in float32, and inside a
    caller's autocast region autocast would reuse its cached low-precision copies of the
    weights across steps, so the forward pass would never see the updates.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.autocast(device_type=device.type, enabled=False):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, ...]:
    """A shuffled split of ``range(n)`` into about n / batch_size batches of near-equal size.

    Equal sizes instead of a short remainder, and never a batch of one spot (for n >= 2):
    a remainder of one or two spots would give contrastive and batch-norm layers a
    degenerate batch.
    """
    order = torch.randperm(n, generator=generator).to(device)
    return torch.tensor_split(order, max(1, min(math.ceil(n / batch_size), n // 2)))


def train_epochs(
    method: str,
    batch_loss: Callable[[Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    n: int,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressCallback | None,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """Run ``epochs`` shuffled passes of ``batch_loss(spot_indices)``; return the per-epoch mean loss.

    The loss is summed on the device and read once per epoch (no host sync per step).
    Raises as soon as an epoch's loss is not finite instead of training on NaNs.
    """
    history: list[float] = []
    report_every = max(1, epochs // 10)
    for epoch in range(epochs):
        total = torch.zeros((), device=device)
        for index in batches(n, batch_size, generator, device):
            loss = batch_loss(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += loss.detach().float() * index.shape[0]
        epoch_loss = float(total) / n
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"{method}: loss became {epoch_loss} at epoch {epoch + 1}/{epochs}")
        history.append(epoch_loss)
        if progress is not None:
            progress(epoch + 1, epochs, epoch_loss)
        if (epoch + 1) % report_every == 0:
            log.info("%s: epoch %d/%d, loss %.4f", method, epoch + 1, epochs, epoch_loss)
    return history


def _mlp(n_in: int, hidden: int, n_out: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.GELU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, n_out))
    return nn.Sequential(*layers)


def _n_parameters(*modules: nn.Module) -> int:
    return int(sum(p.numel() for m in modules for p in m.parameters()))


def _common_info(method: str, gene: np.ndarray, vision: np.ndarray, fused: np.ndarray, history: list[float],
                 seconds: float, device: torch.device, seed: int, epochs: int) -> dict:
    return {
        "method": method,
        "epochs": int(epochs),
        "initial_loss": history[0],
        "final_loss": history[-1],
        "loss_history": history,
        "seconds": seconds,
        "device": str(device),
        "seed": int(seed),
        "n_spots": int(gene.shape[0]),
        "dims": {"gene": int(gene.shape[1]), "vision": int(vision.shape[1]), "fused": int(fused.shape[1])},
        "input_normalization": "none here: inputs used as given (standardised by the caller)",
    }


def llava_mlp_fusion(
    gene: np.ndarray,
    vision: np.ndarray,
    *,
    device: str = "cpu",
    seed: int = 0,
    epochs: int = 200,
    hidden_dim: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, dict]:
    """LLaVA-style projector: Linear-GELU-Linear from the vision embedding into gene space.

    As LLaVA's stage-1 feature alignment maps frozen image features into the language
    model's embedding space, the projector maps each spot's vision embedding to that
    spot's gene embedding, trained by mean-squared error (the gene side is the frozen
    target). ``hidden_dim`` defaults to the gene width, as in LLaVA-1.5's projector.

    Fused output = ``[gene, projected_vision]`` (concatenation, width 2 x d_gene). The gene
    embedding is kept unchanged, so no gene information is lost, and the projection adds
    what the image predicts about expression (its regression onto gene space). Both
    halves live on the gene embedding's scale, so they weigh comparably without any
    rescaling here.
    """
    method = "llava_mlp"
    gene_np, vision_np = check_pair(method, gene, vision)
    hidden = gene_np.shape[1] if hidden_dim is None else hidden_dim
    check_hyperparameters(method, positive_ints={"epochs": epochs, "hidden_dim": hidden, "batch_size": batch_size},
                          positive_floats={"lr": lr}, non_negative_floats={"weight_decay": weight_decay})
    dev = torch.device(device)
    start = time.perf_counter()
    with training_context(seed, dev) as generator:
        projector = _mlp(vision_np.shape[1], hidden, gene_np.shape[1]).to(dev)
        gene_t = torch.tensor(gene_np, device=dev)
        vision_t = torch.tensor(vision_np, device=dev)
        optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=weight_decay)

        def batch_loss(index: Tensor) -> Tensor:
            return F.mse_loss(projector(vision_t[index]), gene_t[index])

        projector.train()
        history = train_epochs(method, batch_loss, optimizer, n=gene_np.shape[0], batch_size=batch_size,
                               epochs=epochs, generator=generator, device=dev, progress=progress)
        projector.eval()
        with torch.no_grad():
            projected = projector(vision_t).cpu().numpy()
    fused = np.concatenate([gene_np, projected], axis=1).astype(np.float32, copy=False)
    info = _common_info(method, gene_np, vision_np, fused, history, time.perf_counter() - start, dev, seed, epochs)
    info.update({
        "fused_as": "concat[gene, projected_vision]",
        "objective": "mse(projector(vision), gene)",
        "hidden_dim": int(hidden),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "batch_size": int(batch_size),
        "n_parameters": _n_parameters(projector),
    })
    return fused, info


def basic_contrastive_fusion(
    gene: np.ndarray,
    vision: np.ndarray,
    *,
    device: str = "cpu",
    seed: int = 0,
    epochs: int = 200,
    embed_dim: int = 64,
    hidden_dim: int = 256,
    temperature: float = 0.1,
    dropout: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, dict]:
    """Two MLP encoders (gene, vision) into a shared ``embed_dim`` space, trained CLIP-style.

    Loss: the symmetric cross-modal :func:`~mihd_assets.fusion.losses.info_nce` over each
    mini-batch (the same spot's two projections are the positive pair, the other spots
    of the batch the negatives). Dropout inside the encoders is the only perturbation.

    Fused output = concatenation of the two L2-normalised projections (width
    2 x ``embed_dim``): each half has unit norm, so both modalities weigh equally, and
    concatenating (rather than averaging) keeps whatever each modality encodes beyond the
    aligned part instead of cancelling it.
    """
    method = "basic_contrastive"
    gene_np, vision_np = check_pair(method, gene, vision)
    check_hyperparameters(method, positive_ints={"epochs": epochs, "embed_dim": embed_dim, "hidden_dim": hidden_dim,
                                                 "batch_size": batch_size},
                          positive_floats={"temperature": temperature, "lr": lr},
                          non_negative_floats={"weight_decay": weight_decay, "dropout": dropout})
    if batch_size < 2:
        raise FusionInputError(f"{method}: batch_size must be >= 2 (in-batch negatives), got {batch_size}")
    dev = torch.device(device)
    start = time.perf_counter()
    with training_context(seed, dev) as generator:
        gene_encoder = _mlp(gene_np.shape[1], hidden_dim, embed_dim, dropout).to(dev)
        vision_encoder = _mlp(vision_np.shape[1], hidden_dim, embed_dim, dropout).to(dev)
        gene_t = torch.tensor(gene_np, device=dev)
        vision_t = torch.tensor(vision_np, device=dev)
        params = [*gene_encoder.parameters(), *vision_encoder.parameters()]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

        def batch_loss(index: Tensor) -> Tensor:
            return info_nce(gene_encoder(gene_t[index]), vision_encoder(vision_t[index]), temperature)

        gene_encoder.train()
        vision_encoder.train()
        history = train_epochs(method, batch_loss, optimizer, n=gene_np.shape[0], batch_size=batch_size,
                               epochs=epochs, generator=generator, device=dev, progress=progress)
        gene_encoder.eval()
        vision_encoder.eval()
        with torch.no_grad():
            fused_t = torch.cat([F.normalize(gene_encoder(gene_t), dim=1),
                                 F.normalize(vision_encoder(vision_t), dim=1)], dim=1)
            fused = fused_t.cpu().numpy().astype(np.float32, copy=False)
    info = _common_info(method, gene_np, vision_np, fused, history, time.perf_counter() - start, dev, seed, epochs)
    info.update({
        "fused_as": "concat[l2norm(gene_projection), l2norm(vision_projection)]",
        "objective": "symmetric cross-modal InfoNCE, in-batch negatives",
        "embed_dim": int(embed_dim),
        "hidden_dim": int(hidden_dim),
        "temperature": float(temperature),
        "dropout": float(dropout),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "batch_size": int(batch_size),
        "n_parameters": _n_parameters(gene_encoder, vision_encoder),
    })
    return fused, info


class _QFormerLayer(nn.Module):
    """Pre-norm block: query self-attention, cross-attention from queries to modality tokens, MLP."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attention = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, 4 * dim, dim, dropout)

    def forward(self, queries: Tensor, tokens: Tensor, ignored_tokens: Tensor) -> Tensor:
        h = self.self_norm(queries)
        queries = queries + self.self_attention(h, h, h, need_weights=False)[0]
        h = self.cross_norm(queries)
        queries = queries + self.cross_attention(h, tokens, tokens, key_padding_mask=ignored_tokens, need_weights=False)[0]
        return queries + self.mlp(self.mlp_norm(queries))


class _QFormer(nn.Module):
    """Learned queries reading tokens of both modalities; pooled query output is the spot's embedding."""

    def __init__(self, gene_dim: int, vision_dim: int, *, n_queries: int, tokens_per_modality: int, dim: int,
                 n_heads: int, n_layers: int, dropout: float):
        super().__init__()
        self.tokens_per_modality = tokens_per_modality
        self.dim = dim
        self.gene_tokenizer = nn.Linear(gene_dim, tokens_per_modality * dim)
        self.vision_tokenizer = nn.Linear(vision_dim, tokens_per_modality * dim)
        # Position-and-modality embedding of each of the 2T context tokens.
        self.token_embedding = nn.Parameter(0.02 * torch.randn(2 * tokens_per_modality, dim))
        self.token_norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(0.02 * torch.randn(n_queries, dim))
        self.layers = nn.ModuleList(_QFormerLayer(dim, n_heads, dropout) for _ in range(n_layers))
        self.out_norm = nn.LayerNorm(dim)

    def tokenize(self, gene: Tensor, vision: Tensor) -> Tensor:
        """The 2T context tokens of each spot: T from the gene embedding, then T from the vision one."""
        batch = gene.shape[0]
        tokens = torch.cat([
            self.gene_tokenizer(gene).view(batch, self.tokens_per_modality, self.dim),
            self.vision_tokenizer(vision).view(batch, self.tokens_per_modality, self.dim),
        ], dim=1)
        return self.token_norm(tokens + self.token_embedding)

    def forward(self, tokens: Tensor, ignored_tokens: Tensor) -> Tensor:
        """Mean query output per spot; ``ignored_tokens`` (True = hidden) masks tokens per spot."""
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, tokens, ignored_tokens)
        return self.out_norm(queries).mean(dim=1)


def qformer_fusion(
    gene: np.ndarray,
    vision: np.ndarray,
    *,
    device: str = "cpu",
    seed: int = 0,
    epochs: int = 200,
    n_queries: int = 8,
    tokens_per_modality: int = 4,
    model_dim: int = 64,
    n_heads: int = 4,
    n_layers: int = 2,
    dropout: float = 0.1,
    contrastive_weight: float = 1.0,
    temperature: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    batch_size: int = 256,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, dict]:
    """BLIP-2-style Q-Former: ``n_queries`` learned queries cross-attending to both modalities.

    Each modality's embedding is projected to ``tokens_per_modality`` tokens of width
    ``model_dim``; the queries self-attend and cross-attend to the token set over
    ``n_layers`` blocks, and their mean is the spot's embedding.

    Self-supervised objective, on three views of every spot (both modalities / gene
    tokens only / vision tokens only, by masking the other modality's tokens):

    * reconstruction: small MLP decoders rebuild *both* input embeddings (MSE) from each
      view's pooled queries. From a single-modality view this means predicting the
      missing modality, which rewards the information the modalities share (the tissue
      domain) over modality-specific noise; from the joint view it keeps the pooled
      queries a complete summary of the spot.
    * cross-modal contrast (BLIP-2's image-text contrastive stage): InfoNCE between the
      gene-only and the vision-only pooled queries of the same spot, weighted by
      ``contrastive_weight``.

    Fused output = the pooled query output of the joint view (width ``model_dim``).
    """
    method = "qformer"
    gene_np, vision_np = check_pair(method, gene, vision)
    check_hyperparameters(method, positive_ints={"epochs": epochs, "n_queries": n_queries,
                                                 "tokens_per_modality": tokens_per_modality, "model_dim": model_dim,
                                                 "n_heads": n_heads, "n_layers": n_layers, "batch_size": batch_size},
                          positive_floats={"temperature": temperature, "lr": lr},
                          non_negative_floats={"weight_decay": weight_decay, "dropout": dropout,
                                               "contrastive_weight": contrastive_weight})
    if model_dim % n_heads:
        raise FusionInputError(f"{method}: model_dim={model_dim} must be divisible by n_heads={n_heads}")
    if batch_size < 2:
        raise FusionInputError(f"{method}: batch_size must be >= 2 (in-batch negatives), got {batch_size}")
    dev = torch.device(device)
    n_tokens = tokens_per_modality
    start = time.perf_counter()
    with training_context(seed, dev) as generator:
        qformer = _QFormer(gene_np.shape[1], vision_np.shape[1], n_queries=n_queries, tokens_per_modality=n_tokens,
                           dim=model_dim, n_heads=n_heads, n_layers=n_layers, dropout=dropout).to(dev)
        gene_decoder = _mlp(model_dim, 2 * model_dim, gene_np.shape[1]).to(dev)
        vision_decoder = _mlp(model_dim, 2 * model_dim, vision_np.shape[1]).to(dev)
        contrast_head = nn.Linear(model_dim, model_dim).to(dev)
        modules = (qformer, gene_decoder, vision_decoder, contrast_head)
        gene_t = torch.tensor(gene_np, device=dev)
        vision_t = torch.tensor(vision_np, device=dev)
        # Token masks of the three views (True = token hidden): joint, gene only, vision only.
        hide_none = torch.zeros(2 * n_tokens, dtype=torch.bool, device=dev)
        hide_vision = torch.cat([torch.zeros(n_tokens, dtype=torch.bool), torch.ones(n_tokens, dtype=torch.bool)]).to(dev)
        view_masks = torch.stack([hide_none, hide_vision, ~hide_vision])
        optimizer = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=lr, weight_decay=weight_decay)

        def batch_loss(index: Tensor) -> Tensor:
            g, v = gene_t[index], vision_t[index]
            b = g.shape[0]
            # Tokenize once (the vision tokenizer is the widest layer), then one pass over
            # the three views stacked along the batch.
            tokens = qformer.tokenize(g, v).repeat(3, 1, 1)
            pooled = qformer(tokens, view_masks.repeat_interleave(b, dim=0))
            reconstruction = (F.mse_loss(gene_decoder(pooled), g.repeat(3, 1))
                              + F.mse_loss(vision_decoder(pooled), v.repeat(3, 1)))
            gene_only, vision_only = pooled[b:2 * b], pooled[2 * b:]
            contrast = info_nce(contrast_head(gene_only), contrast_head(vision_only), temperature)
            return reconstruction + contrastive_weight * contrast

        for m in modules:
            m.train()
        history = train_epochs(method, batch_loss, optimizer, n=gene_np.shape[0], batch_size=batch_size,
                               epochs=epochs, generator=generator, device=dev, progress=progress)
        for m in modules:
            m.eval()
        with torch.no_grad():
            joint = hide_none.expand(gene_np.shape[0], -1)
            fused = qformer(qformer.tokenize(gene_t, vision_t), joint).cpu().numpy().astype(np.float32, copy=False)
    info = _common_info(method, gene_np, vision_np, fused, history, time.perf_counter() - start, dev, seed, epochs)
    info.update({
        "fused_as": "mean of the query outputs, both modalities visible",
        "objective": "reconstruct gene and vision from joint / gene-only / vision-only query outputs (MSE) "
                     "+ contrastive_weight x InfoNCE(gene-only, vision-only)",
        "n_queries": int(n_queries),
        "tokens_per_modality": int(tokens_per_modality),
        "model_dim": int(model_dim),
        "n_heads": int(n_heads),
        "n_layers": int(n_layers),
        "dropout": float(dropout),
        "contrastive_weight": float(contrastive_weight),
        "temperature": float(temperature),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "batch_size": int(batch_size),
        "n_parameters": _n_parameters(*modules),
    })
    return fused, info

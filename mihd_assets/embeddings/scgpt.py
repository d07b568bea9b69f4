"""scGPT cell embeddings from a local checkpoint folder (our own code, not scGPT's).

This re-implements the part of scGPT's ``TransformerModel`` that produces cell
embeddings, with the module names its checkpoints use, so a ``best_model.pt`` loads
into it key for key:

* ``encoder`` (gene tokens): ``encoder.embedding`` -> ``encoder.enc_norm``;
* ``value_encoder`` (continuous): clamp(max=512) -> ``linear1`` -> ReLU -> ``linear2``
  -> ``norm`` -> dropout;
* input = gene embedding + value embedding;
* ``transformer_encoder``: ``torch.nn.TransformerEncoder`` of post-norm
  ``TransformerEncoderLayer(d_model=embsize, nhead=nheads, dim_feedforward=d_hid,
  batch_first=True)`` x ``nlayers``, with a key padding mask;
* the cell embedding is the output at position 0, the ``<cls>`` token.

A checkpoint folder holds ``vocab.json`` (token -> id, with ``<pad>``, ``<cls>``,
``<eoc>``), ``args.json`` (``embsize``, ``nheads``, ``d_hid``, ``nlayers``,
``pad_token``, ``pad_value``, ``input_style``, ``input_emb_style``, ``n_bins``, ...)
and ``best_model.pt`` (a state dict). The released checkpoints were trained with
flash-attention, whose packed ``self_attn.Wqkv`` projection holds the same [q; k; v]
blocks that torch calls ``self_attn.in_proj_``; those keys are renamed on load.

Tokenisation per cell follows scGPT's ``embed_data``: expressed (non-zero) genes that
are in the vocabulary, ``<cls>`` first with value ``pad_value``, expression values
binned per cell into ``n_bins`` quantile bins (when ``input_style`` is ``binned``),
padding with the pad token and ``pad_value`` under a key padding mask. Two deliberate
differences, both recorded in the info dict: cells with more than ``max_genes``
expressed genes keep their most highly expressed genes (scGPT samples at random, which
would make embeddings change between runs), and the output is the raw ``<cls>`` vector
(scGPT L2-normalises it; here embeddings are stored raw and normalised by the consumer).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from ..fileio import atomic_path, atomic_write_text, file_sha256

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
ARGS_FILE = "args.json"
WEIGHTS_FILE = "best_model.pt"
CLS_TOKEN = "<cls>"
SPECIAL_TOKENS = ("<pad>", CLS_TOKEN, "<eoc>")
WEIGHTS_SETTING = "ModelWeightsResource.scgpt_dir (environment variable MIHD_SCGPT_DIR)"
# Written into args.json by save_random_scgpt so every embedding made from such a folder says so.
RANDOM_WEIGHTS_KEY = "mihd_weights"

# Heads of scGPT's TransformerModel that its cell-embedding path (_encode, then the
# <cls> output) never runs. Only these are dropped from a checkpoint; anything else
# that does not match the model is an error.
UNUSED_CHECKPOINT_HEADS = {
    "decoder.": "expression decoder (masked gene-expression prediction)",
    "mvc_decoder.": "masked value prediction for cell embedding (MVC) decoder",
    "cls_decoder.": "cell-type classification decoder",
    "grad_reverse_discriminator.": "batch adversarial (DAB) discriminator",
    "flag_encoder.": "generative-training flag embedding (applies to generated genes only)",
}
FLASH_ATTENTION_RENAMES = (
    (re.compile(r"self_attn\.(_impl\.)?Wqkv\."), "self_attn.in_proj_"),
    (re.compile(r"self_attn\._impl\.out_proj\."), "self_attn.out_proj."),
)
INPUT_STYLES = ("binned", "log1p", "normed_raw")
NORMALIZE_TARGET_SUM = 1e4
VALUE_CLAMP = 512.0  # scGPT's ContinuousValueEncoder clips inputs at max_value=512


class ScGPTError(ValueError):
    """A scGPT folder, checkpoint or input is unusable; the message names the file or setting."""


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm (scGPT's ``encoder``)."""

    def __init__(self, n_tokens: int, d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(tokens))


class ContinuousValueEncoder(nn.Module):
    """Expression value -> vector (scGPT's ``value_encoder`` for ``input_emb_style="continuous"``)."""

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=VALUE_CLAMP)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class ScGPTCellEncoder(nn.Module):
    """The cell-embedding path of scGPT's ``TransformerModel`` (same parameter names)."""

    def __init__(self, n_tokens: int, embsize: int, nheads: int, d_hid: int, nlayers: int, dropout: float):
        super().__init__()
        if embsize % nheads:
            raise ScGPTError(f"embsize {embsize} is not divisible by nheads {nheads}")
        self.encoder = GeneEncoder(n_tokens, embsize)
        self.value_encoder = ContinuousValueEncoder(embsize, dropout)
        layer = nn.TransformerEncoderLayer(embsize, nheads, d_hid, dropout, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        # scGPT's init_weights: only the gene embedding gets a custom range.
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Per-token outputs (batch, seq_len, embsize); ``padding_mask`` is True at padding."""
        x = self.encoder(tokens) + self.value_encoder(values)
        return self.transformer_encoder(x, src_key_padding_mask=padding_mask)

    def cell_embedding(self, tokens: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.forward(tokens, values, padding_mask)[:, 0, :]


@dataclass
class ScGPTModel:
    """A loaded checkpoint folder: network (eval mode, CPU), vocabulary, args and provenance."""

    network: ScGPTCellEncoder
    vocab: dict[str, int]
    args: dict
    model_dir: Path
    weights: str  # "random" (save_random_scgpt) or "pretrained"
    weights_sha256: str
    ignored_keys: dict[str, int]  # unused head prefix -> number of checkpoint tensors dropped
    renamed_keys: int  # flash-attention keys renamed to torch names

    @property
    def input_style(self) -> str:
        # scGPT's embed_data always bins, whatever the folder says; follow it when args are silent.
        return self.args.get("input_style", "binned")

    @property
    def pad_id(self) -> int:
        return self.vocab[self.args["pad_token"]]

    @property
    def cls_id(self) -> int:
        return self.vocab[CLS_TOKEN]


def _require_dir(model_dir: str | Path | None) -> Path:
    if model_dir is None or not str(model_dir).strip():
        raise ScGPTError(
            f"no scGPT weights folder configured: set {WEIGHTS_SETTING} to a local folder holding "
            f"{VOCAB_FILE}, {ARGS_FILE} and {WEIGHTS_FILE} (weights are never downloaded)"
        )
    path = Path(model_dir)
    if not path.is_dir():
        raise ScGPTError(f"scGPT weights folder {path} does not exist (from {WEIGHTS_SETTING})")
    missing = [name for name in (VOCAB_FILE, ARGS_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise ScGPTError(f"scGPT weights folder {path} lacks {missing} (from {WEIGHTS_SETTING})")
    return path


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ScGPTError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ScGPTError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_vocab(path: Path, pad_token: str) -> dict[str, int]:
    vocab = _read_json(path)
    bad = [tok for tok, idx in vocab.items() if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0]
    if bad:
        raise ScGPTError(f"{path}: token ids must be non-negative integers; bad entries for {bad[:5]}")
    missing = [tok for tok in (pad_token, CLS_TOKEN) if tok not in vocab]
    if missing:
        raise ScGPTError(f"{path}: vocabulary lacks the special tokens {missing}")
    if len(set(vocab.values())) != len(vocab):
        raise ScGPTError(f"{path}: several tokens share one id ({len(vocab)} tokens, {len(set(vocab.values()))} ids)")
    return vocab


def _read_args(path: Path) -> dict:
    args = _read_json(path)
    missing = [k for k in ("embsize", "nheads", "d_hid", "nlayers", "pad_token", "pad_value") if k not in args]
    if missing:
        raise ScGPTError(f"{path}: missing keys {missing}")
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise ScGPTError(f"{path}: input_emb_style {style!r} is not supported (only 'continuous')")
    input_style = args.get("input_style", "binned")  # see ScGPTModel.input_style
    if input_style not in INPUT_STYLES:
        raise ScGPTError(f"{path}: input_style {input_style!r} is not one of {list(INPUT_STYLES)}")
    if input_style == "binned" and int(args.get("n_bins", 0)) < 3:
        raise ScGPTError(f"{path}: input_style 'binned' needs n_bins >= 3, got {args.get('n_bins')!r}")
    # scGPT's flash pre-norm layer normalises differently from torch's norm_first; refuse it.
    if args.get("pre_norm"):
        raise ScGPTError(f"{path}: pre_norm checkpoints are not supported")
    return args


def _canonical_state(path: Path, state: dict) -> tuple[dict, dict[str, int], int]:
    """Rename flash-attention keys and drop the unused heads (counted per head)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ScGPTError(f"{path}: expected a state dict (parameter name -> tensor)")
    ignored = {prefix: 0 for prefix in UNUSED_CHECKPOINT_HEADS}
    out: dict[str, torch.Tensor] = {}
    renamed = 0
    for key, value in state.items():
        head = next((p for p in UNUSED_CHECKPOINT_HEADS if key.startswith(p)), None)
        if head is not None:
            ignored[head] += 1
            continue
        new = key
        for pattern, repl in FLASH_ATTENTION_RENAMES:
            new = pattern.sub(repl, new)
        renamed += new != key
        out[new] = value
    return out, {p: n for p, n in ignored.items() if n}, renamed


def load_scgpt(model_dir: str | Path | None) -> ScGPTModel:
    """Read ``vocab.json``, ``args.json`` and ``best_model.pt`` from a local folder.

    Every tensor of the embedding path must be in the checkpoint with the right shape,
    and every checkpoint tensor must belong to it or to one of the unused heads in
    :data:`UNUSED_CHECKPOINT_HEADS`; otherwise the error names the file and the keys.
    """
    path = _require_dir(model_dir)
    args = _read_args(path / ARGS_FILE)
    vocab = _read_vocab(path / VOCAB_FILE, args["pad_token"])
    weights_path = path / WEIGHTS_FILE
    try:
        raw = torch.load(weights_path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise ScGPTError(f"{weights_path}: cannot be read as a torch state dict ({exc})") from exc
    state, ignored, renamed = _canonical_state(weights_path, raw)
    network = ScGPTCellEncoder(
        n_tokens=max(vocab.values()) + 1,
        embsize=int(args["embsize"]),
        nheads=int(args["nheads"]),
        d_hid=int(args["d_hid"]),
        nlayers=int(args["nlayers"]),
        dropout=float(args.get("dropout", 0.2)),
    )
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ScGPTError(
            f"{weights_path}: checkpoint does not match the scGPT embedding model "
            f"(embsize={args['embsize']}, nlayers={args['nlayers']}): missing keys {missing}; "
            f"unexpected keys {unexpected}"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape
    ]
    if wrong:
        raise ScGPTError(
            f"{weights_path}: tensor shapes do not match {path / ARGS_FILE} / {path / VOCAB_FILE} "
            f"({len(vocab)} tokens, max id {max(vocab.values())}): {wrong}"
        )
    network.load_state_dict(state, strict=True)
    network.eval()
    return ScGPTModel(
        network=network,
        vocab=vocab,
        args=args,
        model_dir=path,
        weights="random" if args.get(RANDOM_WEIGHTS_KEY) == "random" else "pretrained",
        weights_sha256=file_sha256(weights_path),
        ignored_keys=ignored,
        renamed_keys=int(renamed),
    )


def match_genes(
    adata: ad.AnnData, vocab: dict[str, int], gene_id_column: str | None = "gene_ids"
) -> tuple[np.ndarray, dict]:
    """Vocabulary id per gene (-1 when absent): by symbol (``var_names``), else by ``var[gene_id_column]``."""
    special = set(SPECIAL_TOKENS)

    def lookup(names: Iterable) -> np.ndarray:
        return np.array([vocab.get(str(n), -1) if str(n) not in special else -1 for n in names], dtype=np.int64)

    ids = lookup(adata.var_names)
    by_symbol = int((ids >= 0).sum())
    by_id = 0
    use_ids = gene_id_column is not None and gene_id_column in adata.var.columns
    if use_ids:
        fallback = lookup(adata.var[gene_id_column])
        fill = (ids < 0) & (fallback >= 0)
        ids[fill] = fallback[fill]
        by_id = int(fill.sum())
    report = {
        "n_genes_input": int(adata.n_vars),
        "n_genes_matched": by_symbol + by_id,
        "n_genes_matched_by_symbol": by_symbol,
        "n_genes_matched_by_id": by_id,
        "gene_id_column": gene_id_column if use_ids else None,
    }
    return ids, report


def bin_values(values: np.ndarray, n_bins: int) -> np.ndarray:
    """scGPT's per-cell binning of positive values into 1..n_bins-1 (0 is kept for "not expressed").

    Edges are the ``n_bins - 1`` quantiles of the cell's own non-zero values, so bins mean
    the same relative rank in every cell whatever its depth. Like scGPT's default
    (``side="one"``) a value goes to ``np.digitize``'s left bin, which is deterministic.
    """
    if values.size == 0:
        return values.astype(np.float32)
    edges = np.quantile(values, np.linspace(0.0, 1.0, n_bins - 1))
    return np.digitize(values, edges).astype(np.float32)


def _cell_values(row: np.ndarray, total: float, input_style: str, n_bins: int) -> np.ndarray:
    if input_style == "binned":
        return bin_values(row, n_bins)
    normed = row * (NORMALIZE_TARGET_SUM / total)
    return (np.log1p(normed) if input_style == "log1p" else normed).astype(np.float32)


def tokenize_cells(
    counts: sp.csr_matrix,
    vocab_ids: np.ndarray,
    model: ScGPTModel,
    max_genes: int,
) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """Token ids and values per cell, each starting with ``<cls>`` (value ``pad_value``).

    Values are computed from all of a cell's expressed in-vocabulary genes before the
    ``max_genes`` cap (as scGPT bins before it samples); library size for ``log1p`` /
    ``normed_raw`` is the cell's total over every gene of the matrix.
    """
    input_style = model.input_style
    n_bins = int(model.args.get("n_bins", 0))
    pad_value = float(model.args["pad_value"])
    totals = np.asarray(counts.sum(axis=1)).ravel()
    tokens: list[np.ndarray] = []
    values: list[np.ndarray] = []
    truncated = empty = 0
    for i in range(counts.shape[0]):
        start, end = counts.indptr[i], counts.indptr[i + 1]
        cols, data = counts.indices[start:end], counts.data[start:end]
        keep = (data > 0) & (vocab_ids[cols] >= 0)
        cols, data = cols[keep], data[keep].astype(np.float64)
        vals = _cell_values(data, float(totals[i]), input_style, n_bins)
        if cols.size > max_genes:
            truncated += 1
            # Highest raw expression first; the stable sort breaks ties by gene order.
            top = np.sort(np.argsort(-data, kind="stable")[:max_genes])
            cols, vals = cols[top], vals[top]
        empty += cols.size == 0
        tokens.append(np.concatenate([[model.cls_id], vocab_ids[cols]]).astype(np.int64))
        values.append(np.concatenate([[pad_value], vals]).astype(np.float32))
    lengths = np.array([t.size for t in tokens])
    report = {
        "n_cells_truncated": int(truncated),
        "n_cells_without_expressed_genes": int(empty),
        "tokens_per_cell_median": float(np.median(lengths)) if lengths.size else 0.0,
        "tokens_per_cell_max": int(lengths.max()) if lengths.size else 0,
    }
    return tokens, values, report


def pad_batch(
    tokens: list[np.ndarray], values: list[np.ndarray], pad_id: int, pad_value: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest cell; the mask is True at padding (torch's key padding convention)."""
    length = max(t.size for t in tokens)
    tok = np.full((len(tokens), length), pad_id, dtype=np.int64)
    val = np.full((len(tokens), length), pad_value, dtype=np.float32)
    mask = np.ones((len(tokens), length), dtype=bool)
    for i, (t, v) in enumerate(zip(tokens, values)):
        tok[i, : t.size] = t
        val[i, : v.size] = v
        mask[i, : t.size] = False
    return torch.from_numpy(tok), torch.from_numpy(val), torch.from_numpy(mask)


def _counts_matrix(adata: ad.AnnData, layer: str | None) -> sp.csr_matrix:
    if layer is not None and layer not in adata.layers:
        raise ScGPTError(f"adata has no layer {layer!r} (layers: {list(adata.layers)}); shape {adata.shape}")
    X = adata.layers[layer] if layer is not None else adata.X
    # A private sorted copy: gene order within a cell is then var order, and the caller's layer is untouched.
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    X.sum_duplicates()
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ScGPTError(f"scGPT needs a non-empty 2-D spots x genes matrix, got shape {X.shape}")
    if not np.all(np.isfinite(X.data)):
        raise ScGPTError(f"expression matrix of shape {X.shape} holds non-finite values")
    if X.data.size and X.data.min() < 0:
        raise ScGPTError(
            f"expression matrix of shape {X.shape} (layer {layer!r}) has negative values; scGPT needs "
            "non-negative expression such as raw counts"
        )
    return X


def scgpt_embedding(
    adata: ad.AnnData,
    model_dir: str | Path | None,
    max_genes: int = 1200,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    layer: str | None = "counts",
    gene_id_column: str | None = "gene_ids",
    amp: bool = False,
) -> tuple[np.ndarray, dict]:
    """Raw scGPT ``<cls>`` embeddings (float32, ``(n_spots, embsize)``) of ``adata``.

    ``layer`` selects non-negative expression (raw counts by default; the processed
    ``X`` is scaled and centred). ``max_genes`` caps gene tokens per cell (the sequence
    is ``max_genes + 1`` long with ``<cls>``). ``amp`` enables CUDA autocast as scGPT
    does; it is ignored on CPU. The path has no random step, so ``seed`` is only
    recorded: it keeps one call signature across the gene encoders.
    """
    if max_genes < 1 or batch_size < 1:
        raise ScGPTError(f"max_genes and batch_size must be >= 1, got {max_genes} and {batch_size}")
    start = time.perf_counter()
    model = load_scgpt(model_dir)
    counts = _counts_matrix(adata, layer)
    vocab_ids, gene_report = match_genes(adata, model.vocab, gene_id_column)
    if gene_report["n_genes_matched"] == 0:
        seen = f"symbols like {list(map(str, adata.var_names[:3]))}"
        if gene_report["gene_id_column"]:
            seen += f", ids like {list(map(str, adata.var[gene_id_column].iloc[:3]))}"
        tokens_seen = [t for t in model.vocab if t not in SPECIAL_TOKENS][:3]
        raise ScGPTError(
            f"none of the {adata.n_vars} genes is in {model.model_dir / VOCAB_FILE} ({len(model.vocab)} tokens): "
            f"{seen}; vocabulary tokens like {tokens_seen}"
        )
    tokens, values, token_report = tokenize_cells(counts, vocab_ids, model, max_genes)
    dev = torch.device(device)
    network = model.network.to(dev)
    embsize = int(model.args["embsize"])
    out = np.empty((len(tokens), embsize), dtype=np.float32)
    use_amp = amp and dev.type == "cuda"
    prepared = time.perf_counter()
    # Batches of similar length waste little compute on padding; the mask keeps each
    # cell's output independent of its batch, so the order only affects speed.
    order = np.argsort([t.size for t in tokens], kind="stable")
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    report_every = max(1, len(chunks) // 10)
    with torch.inference_mode(), torch.autocast(device_type=dev.type, enabled=use_amp):
        for b, idx in enumerate(chunks):
            tok, val, mask = pad_batch(
                [tokens[j] for j in idx], [values[j] for j in idx], model.pad_id, float(model.args["pad_value"])
            )
            emb = network.cell_embedding(tok.to(dev), val.to(dev), mask.to(dev))
            out[idx] = emb.float().cpu().numpy()
            if (b + 1) % report_every == 0 or b + 1 == len(chunks):
                log.info("scGPT: embedded batch %d/%d (%d spots)", b + 1, len(chunks), len(tokens))
    if not np.all(np.isfinite(out)):
        raise ScGPTError(f"scGPT produced non-finite embeddings for {int((~np.isfinite(out)).any(1).sum())} spots")
    done = time.perf_counter()
    info = {
        "method": "scgpt",
        "model_dir": str(model.model_dir),
        "weights": model.weights,
        "weights_sha256": model.weights_sha256,
        "vocab_size": len(model.vocab),
        "embsize": embsize,
        "nlayers": int(model.args["nlayers"]),
        "nheads": int(model.args["nheads"]),
        "input_style": model.input_style,
        "input_style_from": ARGS_FILE if "input_style" in model.args else "default (scGPT's embed_data always bins)",
        "input_emb_style": model.args.get("input_emb_style", "continuous"),
        "n_bins": int(model.args["n_bins"]) if model.input_style == "binned" else None,
        "layer": layer,
        **gene_report,
        **token_report,
        "n_cells": len(tokens),
        "max_genes": int(max_genes),
        "gene_selection": "most expressed genes when over max_genes (scGPT samples at random)",
        "cell_embedding": "<cls> output of the last layer",
        "normalization": "none: raw <cls> outputs (scGPT L2-normalises; left to the consumer)",
        "ignored_checkpoint_heads": {
            prefix: f"{n} tensors, {UNUSED_CHECKPOINT_HEADS[prefix]}" for prefix, n in model.ignored_keys.items()
        },
        "renamed_flash_attention_keys": model.renamed_keys,
        "device": str(dev),
        "amp": use_amp,
        "batch_size": int(batch_size),
        "seed": int(seed),
        "seconds": done - start,
        "load_and_tokenize_seconds": prepared - start,
        "cells_per_second": len(tokens) / (done - prepared),
    }
    return out, info


def save_random_scgpt(
    model_dir: str | Path,
    vocab_genes: Iterable[str],
    embsize: int = 32,
    nheads: int = 2,
    d_hid: int = 64,
    nlayers: int = 2,
    seed: int = 0,
    n_bins: int = 51,
) -> Path:
    """Write a tiny randomly initialised scGPT folder (vocab.json, args.json, best_model.pt).

    Same architecture code as :func:`load_scgpt` uses, for tests and the offline demo;
    ``args.json`` carries ``mihd_weights: random`` so embeddings made from it say so.
    """
    path = Path(model_dir)
    genes = list(dict.fromkeys(str(g) for g in vocab_genes if str(g) not in SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *genes])}
    args = {
        "embsize": embsize,
        "nheads": nheads,
        "d_hid": d_hid,
        "nlayers": nlayers,
        "dropout": 0.2,
        "pad_token": "<pad>",
        "pad_value": -2,
        "mask_value": -1,
        "input_style": "binned",
        "input_emb_style": "continuous",
        "n_bins": n_bins,
        "max_seq_len": 1200,
        RANDOM_WEIGHTS_KEY: "random",
        "seed": seed,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = ScGPTCellEncoder(len(vocab), embsize, nheads, d_hid, nlayers, args["dropout"])
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / VOCAB_FILE, json.dumps(vocab, indent=1))
    atomic_write_text(path / ARGS_FILE, json.dumps(args, indent=1))
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        torch.save(network.state_dict(), tmp)
    return path

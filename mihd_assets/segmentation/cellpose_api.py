"""The only module that imports cellpose: network build/load, training, inference, metrics
(imported inside the steps that need it, so loading the definitions does not import cellpose).

Facts of cellpose 4.2 this wrapper guards against:

* ``CellposeModel(pretrained_model=name)`` silently falls back to the default model for an
  unknown name, and downloads weights from a hub for a known one. Here a model is always a
  local file: an unknown name, or a known name without a local copy, is an error.
* ``BaseModel.load_model`` loads state dicts with ``strict=False``, so a file of another
  architecture would load partially without a word. Here loading is strict.
* ``CellposeModel.__init__`` always builds the ViT-L network (about 18 s per 256 px tile on
  a 2-core CPU). For the CPU demo and tests the same package class (``cellpose.vit.CPSAM``)
  is built with a small ViT encoder (``config: tiny``), saved as a state dict and loaded
  from that file like any checkpoint; the network's shapes say which configuration it is.
* ``train.train_seg`` drops images with fewer than ``min_train_masks`` masks with only a
  log line; the drops are counted here first and returned.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from cellpose import metrics as cp_metrics
from cellpose import models as cp_models
from cellpose import train as cp_train
from cellpose.vit import CPSAM, BaseModel
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from ..fileio import atomic_path, file_sha256
from .plan import EvalSettings
from ..state_dicts import state_dict_mismatch

log = logging.getLogger(__name__)

CELLPOSE_VERSION_RANGE = ">=4.2,<4.3"


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of a CPSAM network. ``cpsam`` is the published ViT-L; ``tiny`` a small encoder
    of the same class for CPU demos (block size 128 instead of cellpose's fixed 256)."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    neck_dim: int
    patch_size: int
    block_px: int


CPSAM_CONFIG = NetworkConfig("cpsam", 1024, 24, 16, 256, 8, 256)
TINY_CONFIG = NetworkConfig("tiny", 64, 2, 4, 64, 8, 128)
# cellpose refuses block sizes other than 256 for backbone "sam_vitl"; the tiny network
# carries its own backbone tag so its 128 px blocks are accepted.
TINY_BACKBONE = "cpsam_tiny"


class CellposeWeightsError(ValueError):
    """A requested model is not a usable local cellpose 4 checkpoint."""


def resolve_weights(name_or_path: str | Path) -> Path:
    """The local file for a model given by path or by cellpose model name; never downloads.

    A known cellpose name (``cpsam``, ``cpsam_v2``, ...) resolves only to a copy already in
    cellpose's model folder; any other name that is not an existing path is an error
    (cellpose itself would silently use its default model instead).
    """
    text = str(name_or_path).strip()
    if not text:
        raise CellposeWeightsError("no cellpose weights given (empty name/path)")
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise CellposeWeightsError(f"cellpose weights {text!r} is a folder, not a state-dict file")
    if text in cp_models.MODEL_NAMES:
        local = cp_models.MODEL_DIR / text
        if local.is_file():
            return local
        raise CellposeWeightsError(
            f"cellpose model {text!r} has no local copy at {local}; this platform never downloads "
            "weights: copy the file there or set MIHD_CELLPOSE_WEIGHTS to its path"
        )
    raise CellposeWeightsError(
        f"cellpose weights {text!r} is neither an existing file nor a known cellpose model name "
        f"{list(cp_models.MODEL_NAMES)} (cellpose would silently fall back to its default model)"
    )


def _build_network(config: NetworkConfig, dtype: torch.dtype) -> CPSAM:
    if config == CPSAM_CONFIG:
        return CPSAM(dtype=dtype)
    # Same class and forward pass as CPSAM, with a small SAM image encoder built directly at
    # the block size (so no resampling of position embeddings is needed).
    net = CPSAM.__new__(CPSAM)
    BaseModel.__init__(net, dtype=dtype)
    net.rdrop = 0.0
    net.backbone = TINY_BACKBONE
    net.encoder = ImageEncoderViT(
        img_size=config.block_px,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        out_chans=config.neck_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=0,
    )
    nout, ps = 3, config.patch_size
    net.out = nn.Conv2d(config.neck_dim, nout * ps**2, kernel_size=1)
    net.W2 = nn.Parameter(torch.eye(nout * ps**2).reshape(nout * ps**2, nout, ps, ps), requires_grad=False)
    net.nout, net.ps = nout, ps
    return net.to(dtype)


def config_from_state_dict(state: dict, source: str) -> NetworkConfig:
    """Which network a cellpose 4 state dict belongs to, from its tensor shapes."""
    if "W2" not in state:
        raise CellposeWeightsError(f"{source}: not a cellpose 4 (CPSAM) state dict (no 'W2' tensor)")
    try:
        embed_dim = state["encoder.patch_embed.proj.weight"].shape[0]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.blocks\.(\d+)\.", k)))
        head_dim = state["encoder.blocks.0.attn.rel_pos_h"].shape[1]
        neck_dim = state["encoder.neck.0.weight"].shape[0]
        tokens = state["encoder.pos_embed"].shape[1]
    except (KeyError, ValueError) as err:
        raise CellposeWeightsError(f"{source}: not a CPSAM encoder state dict ({err})") from err
    ps = int(round((state["W2"].shape[0] / 3) ** 0.5))
    config = NetworkConfig("", int(embed_dim), depth, int(embed_dim // head_dim), int(neck_dim), ps, int(tokens * ps))
    for known in (CPSAM_CONFIG, TINY_CONFIG):
        if {**asdict(config), "name": known.name} == asdict(known):
            return known
    raise CellposeWeightsError(f"{source}: unknown CPSAM network shape {asdict(config)}")


def save_random_network(path: str | Path, config: NetworkConfig = TINY_CONFIG, seed: int = 0) -> str:
    """Write a randomly initialised network of ``config`` as a cellpose state dict; returns its sha256."""
    torch.manual_seed(seed)
    net = _build_network(config, torch.float32)
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)
    return file_sha256(path)


class _LoadedCellposeModel(cp_models.CellposeModel):
    """cellpose's ``CellposeModel`` (its eval, tiling and mask dynamics) around a network
    loaded here: its ``__init__`` is bypassed because it always builds ViT-L, loads
    non-strictly and falls back to a default model for unknown names."""

    def __init__(self, net: CPSAM, device: torch.device, source: Path):
        self.device = device
        self.gpu = device.type == "cuda"
        self.pretrained_model = str(source)
        self.backbone = net.backbone
        self.net = net


@dataclass
class LoadedModel:
    model: _LoadedCellposeModel
    config: NetworkConfig
    path: Path
    sha256: str
    device: torch.device

    @property
    def net(self) -> CPSAM:
        return self.model.net

    def describe(self) -> dict:
        return {"config": self.config.name, "weights_path": str(self.path), "weights_sha256": self.sha256,
                "device": str(self.device), "block_px": self.config.block_px}


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a local cellpose 4 checkpoint strictly (every tensor must match its network)."""
    path = resolve_weights(path)
    device = torch.device(device)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CellposeWeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    config = config_from_state_dict(state, str(path))
    # bfloat16 is cellpose's default on GPUs; on CPU float32 is both faster and exact.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    net = _build_network(config, torch.float32)
    problems = state_dict_mismatch(net.state_dict(), state)
    if problems:
        raise CellposeWeightsError(f"{path}: state dict does not match the {config.name} CPSAM network: "
                                   + "; ".join(problems))
    net.load_state_dict(state, strict=True)
    net = net.to(device)
    if dtype != torch.float32:
        net.dtype = dtype
    return LoadedModel(_LoadedCellposeModel(net, device, path), config, path, file_sha256(path), device)


def segment(model: LoadedModel, images: Sequence[np.ndarray], settings: EvalSettings = EvalSettings()) -> list[np.ndarray]:
    """Instance masks (int32, 0 = background) for channel-first ``[3, H, W]`` images."""
    if not images:
        return []
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image {i}: expected a channel-first [3, H, W] array, got shape {image.shape}")
    # cellpose normalizes its inputs in place: hand it copies so callers keep raw intensities
    # (E5 measures marker intensity on the same arrays after segmentation).
    masks, _, _ = model.model.eval(
        [np.array(im, dtype=np.float32, copy=True) for im in images],
        channel_axis=0,
        batch_size=settings.batch_size,
        flow_threshold=settings.flow_threshold,
        cellprob_threshold=settings.cellprob_threshold,
        min_size=settings.min_size,
        bsize=model.config.block_px,
    )
    return [np.asarray(m, dtype=np.int32) for m in masks]


def count_masks(label_image: np.ndarray) -> int:
    """Number of distinct instances (non-zero labels) in an instance mask."""
    values = np.unique(label_image)
    return int((values != 0).sum())


@dataclass
class TrainResult:
    path: Path
    sha256: str
    n_images_given: int
    n_images_used: int
    dropped: list[int]  # indices (into the given images) with < min_train_masks masks
    min_train_masks: int
    train_losses: list[float]
    seconds: float


def train(
    init_weights: str | Path,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    out_path: str | Path,
    *,
    n_epochs: int,
    learning_rate: float,
    weight_decay: float,
    batch_size: int,
    min_train_masks: int,
    seed: int,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Fine-tune the network in ``init_weights`` with ``cellpose.train.train_seg``; the
    trained state dict is written atomically to ``out_path``.

    Images with fewer than ``min_train_masks`` masks are removed here, before train_seg
    (which would remove the same ones silently), and their indices returned.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} training images but {len(labels)} label images")
    n_masks = [count_masks(lbl) for lbl in labels]
    dropped = [i for i, n in enumerate(n_masks) if n < min_train_masks]
    keep = [i for i in range(len(images)) if i not in set(dropped)]
    if dropped:
        log.warning("%d of %d training images have fewer than min_train_masks=%d masks and are not used: %s",
                    len(dropped), len(images), min_train_masks, dropped)
    if not keep:
        raise ValueError(
            f"no training image has >= min_train_masks={min_train_masks} masks "
            f"(mask counts: {n_masks}); nothing to train on"
        )
    loaded = load_model(init_weights, device)
    torch.manual_seed(seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, _training_progress(progress):
        if progress:
            progress(f"training {Path(out_path).name}: {len(keep)} images, {n_epochs} epochs")
        saved, losses, _ = cp_train.train_seg(
            loaded.net,
            train_data=[np.asarray(images[i], dtype=np.float32) for i in keep],
            train_labels=[np.asarray(labels[i]) for i in keep],
            channel_axis=0,
            batch_size=batch_size,
            n_epochs=n_epochs,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            save_path=tmp,
            save_every=n_epochs + 1,
            min_train_masks=min_train_masks,
            bsize=loaded.config.block_px,
            model_name="trained",
        )
        with atomic_path(out_path) as target:
            shutil.copyfile(saved, target)
    return TrainResult(
        path=Path(out_path),
        sha256=file_sha256(out_path),
        n_images_given=len(images),
        n_images_used=len(keep),
        dropped=dropped,
        min_train_masks=min_train_masks,
        train_losses=[float(x) for x in losses],
        seconds=time.perf_counter() - started,
    )


def matching_counts(true_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray], threshold: float = 0.5):
    """Per-image AP, TP, FP, FN at one IoU threshold, straight from ``cellpose.metrics``."""
    if len(true_masks) != len(pred_masks):
        raise ValueError(f"{len(true_masks)} true masks but {len(pred_masks)} predictions")
    for i, (t, p) in enumerate(zip(true_masks, pred_masks)):
        if t.shape != p.shape:
            raise ValueError(f"image {i}: true mask shape {t.shape} differs from prediction shape {p.shape}")
    ap, tp, fp, fn = cp_metrics.average_precision(
        [np.asarray(t, dtype=np.int32) for t in true_masks],
        [np.asarray(p, dtype=np.int32) for p in pred_masks],
        threshold=[threshold],
    )
    return ap[:, 0], tp[:, 0].astype(int), fp[:, 0].astype(int), fn[:, 0].astype(int)


class _ForwardToProgress(logging.Handler):
    def __init__(self, progress):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress(f"cellpose: {record.getMessage()}")


@contextlib.contextmanager
def _training_progress(progress):
    """cellpose reports epochs and losses on its ``cellpose.train`` logger: forward them to the
    step's progress log. Its CPU-autocast notice (bfloat16 only) repeats every batch on CPU and
    says nothing about the result, so it is silenced for the duration of training."""
    logger = logging.getLogger("cellpose.train")
    handler = _ForwardToProgress(progress) if progress else None
    previous = logger.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
        if handler:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            if handler:
                logger.removeHandler(handler)
                logger.setLevel(previous)

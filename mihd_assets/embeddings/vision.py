"""Vision encoders (timm) for spot patches: registry, local-weights loading, batched inference.

Weights come only from local files (a state dict in ``.bin`` / ``.pth`` / ``.pt`` /
``.safetensors``) loaded with ``strict=True``; without a file the network keeps a seeded
random initialisation and says so in its info (``weights: "random"``). Nothing is ever
fetched from a hub (``pretrained=False`` always).

``tiny=True`` builds a small configuration of the same timm architecture (same model
class and block types, fewer / narrower layers) so tests and the CPU demo stay fast; its
embedding width differs from the full model's and is reported in the info.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..fileio import file_sha256
from ..state_dicts import state_dict_mismatch
from .patches import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

WEIGHTS_SUFFIXES = (".bin", ".pth", ".pt", ".safetensors")
# Layer classes are named here and resolved when a model is built, so the registry can be
# read (e.g. by the benchmark matrix) without importing timm.
_LAYER_NAMES = {
    "mlp_layer": {"SwiGLUPacked": ("timm.layers", "SwiGLUPacked")},
    "act_layer": {"SiLU": ("torch.nn", "SiLU")},
}


class EncoderWeightsError(ValueError):
    """A weights file cannot be read or does not fit the encoder; the message names the file."""


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    timm_name: str
    input_size: int
    embed_dim: int  # width of the full configuration's pooled output
    timm_kwargs: dict = field(default_factory=dict)
    tiny_overrides: dict = field(default_factory=dict)  # applied on top of timm_kwargs
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        EncoderSpec(
            name="resnet50",
            timm_name="resnet50",
            input_size=224,
            embed_dim=2048,
            timm_kwargs={"num_classes": 0},
            # Same Bottleneck ResNet, one block per stage and 1/8 of the channels -> 256-d; the
            # narrow 3x3 stem replaces the 64-channel 7x7 one, which would dominate CPU time.
            tiny_overrides={
                "layers": (1, 1, 1, 1),
                "channels": (8, 16, 32, 64),
                "stem_type": "deep",
                "stem_width": 8,
            },
        ),
        EncoderSpec(
            name="uni",
            timm_name="vit_large_patch16_224",
            input_size=224,
            embed_dim=1024,
            timm_kwargs={
                "img_size": 224,
                "patch_size": 16,
                "init_values": 1e-5,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
            tiny_overrides={"depth": 2, "embed_dim": 64, "num_heads": 2},
        ),
        EncoderSpec(
            name="uni2",
            timm_name="vit_giant_patch14_224",
            input_size=224,
            embed_dim=1536,
            timm_kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "num_classes": 0,
                "no_embed_class": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "SiLU",
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            # SwiGLUPacked needs an even hidden width: 96 * 5.33334 -> 512.
            tiny_overrides={"depth": 2, "embed_dim": 96, "num_heads": 2},
        ),
        EncoderSpec(
            name="hipt",
            timm_name="vit_small_patch16_224",
            input_size=256,
            embed_dim=384,
            timm_kwargs={"img_size": 256, "num_classes": 0},
            tiny_overrides={"depth": 2, "embed_dim": 64, "num_heads": 2},
        ),
    )
}


def encoder_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown vision encoder {name!r}; known: {sorted(ENCODERS)}") from None


def _resolve_layers(kwargs: dict) -> dict:
    resolved = dict(kwargs)
    for key, names in _LAYER_NAMES.items():
        if key in resolved:
            module, attr = names[resolved[key]]
            resolved[key] = getattr(importlib.import_module(module), attr)
    return resolved


def create_encoder_model(name: str, tiny: bool = False) -> torch.nn.Module:
    """The timm network for ``name``, randomly initialised (never fetched from a hub).

    Honours an enclosing ``torch.device(...)`` context, e.g. ``meta`` to inspect the full
    configurations without allocating their weights.
    """
    import timm

    spec = encoder_spec(name)
    kwargs = {**spec.timm_kwargs, **(spec.tiny_overrides if tiny else {})}
    return timm.create_model(spec.timm_name, pretrained=False, **_resolve_layers(kwargs))


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict of tensors from a local weights file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: encoder weights file does not exist")
    suffix = path.suffix.lower()
    if suffix not in WEIGHTS_SUFFIXES:
        raise EncoderWeightsError(f"{path}: unsupported weights format {suffix!r}; expected one of {WEIGHTS_SUFFIXES}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch / safetensors raise many types for damaged files
        raise EncoderWeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise EncoderWeightsError(
            f"{path}: expected a flat state dict of tensors, found {found}; extract the encoder's "
            "state dict (e.g. a checkpoint's 'model' or 'teacher' entry) into its own file"
        )
    return state


def load_weights(model: torch.nn.Module, path: str | Path, label: str) -> None:
    """Load a local state dict with ``strict=True``; a mismatch names the file and keys."""
    state = load_state_dict_file(path)
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise EncoderWeightsError(f"{path}: state dict does not fit {label}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def build_encoder(
    name: str, weights_path: str | Path | None = None, tiny: bool = False, seed: int = 0
) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on CPU, info) for a registered encoder.

    Without ``weights_path`` the weights are a random initialisation drawn with ``seed``
    (the global RNG is left untouched), so reruns give the same embeddings.
    """
    spec = encoder_spec(name)
    config = "tiny" if tiny else "full"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_encoder_model(name, tiny=tiny)
    info = {
        "encoder": name,
        "timm_model": spec.timm_name,
        "config": config,
        "embed_dim": int(model.num_features),
        "input_size": spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    if weights_path is None:
        info.update(weights="random", weights_path=None, random_seed=seed)
    else:
        path = Path(weights_path)
        load_weights(model, path, f"encoder {name!r} ({spec.timm_name}, {config} config)")
        sha = file_sha256(path)
        info.update(weights=f"file:{sha[:16]}", weights_path=str(path.resolve()), weights_sha256=sha)
    model.eval().requires_grad_(False)
    return model, info


class EmbedResult(NamedTuple):
    embeddings: np.ndarray  # (n, d) float32, raw encoder output (no normalization)
    seconds: float
    patches_per_second: float
    amp_dtype: str | None  # autocast dtype actually used; None = float32


def embed(
    model: torch.nn.Module,
    loader: DataLoader,
    device: str | torch.device,
    amp: bool = True,
    progress_callback: Callable[[int, int], None] | None = None,
    progress_every: int = 10,
) -> EmbedResult:
    """Run ``model`` over every batch of ``loader`` (in order) on ``device``.

    The model is moved to ``device``. AMP (bfloat16 where supported, else float16) is used
    only on CUDA; asking for it elsewhere runs float32 and logs a warning, and the result's
    ``amp_dtype`` records what ran. ``progress_callback(done, total)`` is called every
    ``progress_every`` batches and at the end.
    """
    (result,) = embed_views([model], loader, device, amp, progress_callback, progress_every)
    return result


def embed_views(
    models: Sequence[torch.nn.Module],
    loader: DataLoader,
    device: str | torch.device,
    amp: bool = True,
    progress_callback: Callable[[int, int], None] | None = None,
    progress_every: int = 10,
) -> list[EmbedResult]:
    """:func:`embed` for several encoders in one pass over the patches: each batch of
    ``loader`` is a tuple with one tensor per model (a :class:`SharedPatchDataset`), or a
    single tensor when there is one model. Results are in the order of ``models``; their
    ``seconds`` is the whole pass, patch cutting included."""
    if not models:
        raise ValueError("embed_views needs at least one model")
    device = torch.device(device)
    amp_dtype = None
    if amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif amp:
        log.warning("AMP requested on device %s; autocast is used only on CUDA, running float32", device)
    models = [model.to(device).eval() for model in models]
    total = len(loader.dataset)
    if total == 0:
        raise ValueError("nothing to embed: the loader's dataset is empty")
    outputs: list[list[torch.Tensor]] = [[] for _ in models]
    done = 0
    autocast = torch.autocast(device_type="cuda", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    start = time.perf_counter()
    with (
        torch.inference_mode(),
        autocast,
        tqdm(total=total, unit="patch", desc="vision embedding", mininterval=1.0) as bar,
    ):
        for step, batch in enumerate(loader, start=1):
            views = list(batch) if isinstance(batch, (list, tuple)) else [batch]
            if len(views) != len(models):
                raise ValueError(f"the loader yields {len(views)} patch views per batch for {len(models)} encoders")
            for model, view, kept in zip(models, views, outputs):
                view = view.to(device, non_blocking=True)
                out = model(view)
                if out.ndim != 2 or out.shape[0] != view.shape[0]:
                    raise ValueError(
                        f"encoder returned shape {tuple(out.shape)} for a batch of {view.shape[0]}; expected (batch, dim)"
                    )
                # Kept on the device: one transfer at the end instead of a sync per batch.
                kept.append(out.float())
            done += views[0].shape[0]
            bar.update(views[0].shape[0])
            if progress_callback is not None and (step % progress_every == 0 or done == total):
                progress_callback(done, total)
        all_embeddings = [torch.cat(kept).cpu().numpy() for kept in outputs]
    seconds = time.perf_counter() - start
    results = []
    for embeddings in all_embeddings:
        if len(embeddings) != total:
            raise ValueError(f"loader yielded {len(embeddings)} patches for a dataset of {total}")
        bad = int((~np.isfinite(embeddings)).any(axis=1).sum())
        if bad:
            hint = f" under {amp_dtype} autocast; rerun without AMP" if amp_dtype else ""
            raise ValueError(f"{bad} of {total} embeddings are not finite{hint}")
        results.append(EmbedResult(
            embeddings=embeddings,
            seconds=seconds,
            patches_per_second=total / seconds if seconds > 0 else float("inf"),
            amp_dtype=None if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
        ))
    return results

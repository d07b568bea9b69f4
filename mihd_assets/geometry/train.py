"""Training with resumable, atomic checkpoints.

A checkpoint holds the model and optimizer state, both configs, the step, the loss
history, the state of the one random generator that draws batches and noise, and the
fingerprint of the training set. It is written atomically every ``checkpoint_every``
steps, so a killed run leaves the last complete checkpoint; a new run with the same
configs and training set continues from it and, every draw coming from the saved
generator, ends where an uninterrupted run would have. A non-finite loss stops training
with an error and writes nothing, so the file on disk stays the last good checkpoint.

A checkpoint that cannot be resumed (another architecture, objective, model or training
config, training set, a step beyond the requested one, or a file that fails to load) stops
training with :class:`IncompatibleCheckpointError` naming the file and the reason; the file
is left as it is. With ``restart=True`` the file is moved aside to
``<name>.incompatible-<UTC time>`` (a resumable one to ``<name>.restart-<UTC time>``) and
training starts fresh, logged as a warning: no checkpoint is ever overwritten by a new run.

The file holds tensors and plain values only (str, int, float, bool, None in dicts, lists and
tuples; numpy arrays are stored as tensors, string arrays as lists), tagged with
``CHECKPOINT_FORMAT``, and is read with ``torch.load(weights_only=True)``: reading a
checkpoint never runs code named in the file. A file that needs more than that to load (a
crafted pickle, or a checkpoint written before this format) is refused, never loaded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..fileio import atomic_path
from ..state_dicts import state_dict_mismatch
from . import losses
from .config import TrainConfig
from .edm import edm_loss, sample_sigma
from .models import ARCHITECTURE, GeometryModel, ModelConfig, centre
from .targets import GeometrySets, GeometryTrainingSet

# Settings that may change between a run and its resumption without invalidating it.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every")


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/inf; the message names the step, the losses and the kept checkpoint."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into; the message names the keys."""


class CheckpointFormatError(CheckpointMismatchError):
    """A file that is not a weights-only geometry checkpoint of ``CHECKPOINT_FORMAT``; it was not loaded."""


class IncompatibleCheckpointError(CheckpointMismatchError):
    """A checkpoint that this run cannot resume; it is kept unchanged. The message names the file and why."""


# Written into every checkpoint; a file without it (an older format) is refused.
CHECKPOINT_FORMAT = "mihd-geometry-checkpoint-weights-only-1"


# What the losses are; a checkpoint trained under another objective is never resumed.
# v2: the denoiser is trained in the generator's frame (``denoiser_target``).
# v3: noise matching: above the generator's error sigma_gen the denoiser starts from its estimate.
OBJECTIVE = "generator-procrustes+edm-denoiser-in-generator-frame-noise-matched-v3"


@dataclass
class TrainResult:
    step: int
    resumed_from_step: int
    resume_note: str
    seconds: float
    last_losses: dict
    history: list[dict] = field(default_factory=list)
    sigma_gen: float | None = None  # the generator's RMS error the refiner is matched to
    restarted_from_incompatible: bool = False  # restart=True moved a checkpoint that could not be resumed aside
    moved_aside_to: str | None = None  # where restart=True moved the previous checkpoint


def set_batch(ts: GeometryTrainingSet, sets: GeometrySets, rows: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    """Features, targets and mask of ``rows`` of ``sets``, trimmed to the longest set among them."""
    size = sets.size[rows]
    n = int(size.max())
    idx = sets.index[rows, :n]
    feats = np.zeros((len(rows), n, ts.slides[0].features.shape[1]), dtype=np.float32)
    for j, s in enumerate(sets.slide[rows]):
        feats[j, : size[j]] = ts.slides[s].features[idx[j, : size[j]]]
    mask = np.arange(n)[None, :] < size[:, None]
    return (torch.from_numpy(feats).to(device), torch.from_numpy(sets.targets[rows, :n].copy()).to(device),
            torch.from_numpy(mask).to(device))


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked; a no-op context otherwise."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def denoiser_target(target: torch.Tensor, v_cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``target`` rotated/reflected onto the generator's (canonical) estimate ``v_cond``: the
    frame the denoiser is trained and run in. Padded rows stay zero."""
    return losses.procrustes_align(target, v_cond, mask).to(target.dtype) * mask.unsqueeze(-1)


def generator_error(v_cond: torch.Tensor, target_gen_frame: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per set, the RMS per-coordinate error of the generator's estimate (both in its frame)."""
    m = mask.unsqueeze(-1).to(v_cond.dtype)
    sq = (((v_cond - target_gen_frame) ** 2) * m).sum(dim=(1, 2)) / (m.sum(dim=(1, 2)) * v_cond.shape[-1])
    return sq.sqrt()


def compute_losses(model: GeometryModel, feats, target, mask, sigma_data: float, cfg: TrainConfig,
                   generator: torch.Generator, device, amp: bool, sigma_gen: float | None = None) -> dict[str, torch.Tensor]:
    """The weighted losses (``total``) and, unweighted, ``gen_error``: this batch's mean RMS error of
    the generator, from which the training loop keeps sigma_gen (None: use this batch's)."""
    batch = feats.shape[0]
    if cfg.feature_noise:
        feats = feats + cfg.feature_noise * torch.randn(feats.shape, generator=generator).to(device) * mask.unsqueeze(-1)
    sigma = sample_sigma(batch, cfg.p_mean, cfg.p_std, generator, device)
    noise = centre(torch.randn(target.shape, generator=generator).to(device), mask)
    with autocast(device, amp):
        context, v_gen = model(feats, mask)
    v_cond = model.refiner_condition(v_gen, mask)
    # The refiner starts from the generator's estimate + noise, so it works in the generator's
    # frame. The generator is trained up to rotation/reflection (Procrustes), and the canonical
    # frames of an imperfect estimate and of its target can differ by a large rotation: train
    # the denoiser on the target rotated into the generator's frame, or refinement blends two
    # rotated copies of the geometry.
    target_gen_frame = denoiser_target(target, v_cond, mask)
    gen_error = generator_error(v_cond, target_gen_frame, mask).mean().detach()
    start = target_gen_frame + sigma[:, None, None] * noise
    if cfg.generator_noise_matching:
        # The estimate is the target plus noise of about sigma_gen: at every level above that it
        # stands in for the target, topped up with fresh noise to the sampled level.
        s_gen = float(gen_error) if sigma_gen is None else sigma_gen
        from_gen = sigma > s_gen
        top_up = torch.sqrt((sigma**2 - s_gen**2).clamp_min(0.0))
        start = torch.where(from_gen[:, None, None], v_cond.to(target.dtype) + top_up[:, None, None] * noise, start)
    with autocast(device, amp):
        denoised = model.denoiser(start, sigma, context, v_cond, mask, sigma_data)
    v_gen = v_gen.float()
    out = {
        "gen_align": losses.procrustes_mse(v_gen, target, mask),
        "gen_scale": losses.scale_loss(v_gen, target, mask),
        "score": edm_loss(denoised.float(), target_gen_frame, sigma, mask, sigma_data),
    }
    if cfg.w_knn_nca:
        out["knn_nca"] = losses.knn_nca_loss(v_gen, target, mask, cfg.knn_k)
    if cfg.w_edge:
        out["edge"] = losses.edge_loss(v_gen, target, mask, cfg.knn_k)
    weights = {"gen_align": cfg.w_gen_align, "gen_scale": cfg.w_gen_scale, "score": cfg.w_score,
               "knn_nca": cfg.w_knn_nca, "edge": cfg.w_edge}
    out["total"] = sum(weights[k] * v for k, v in out.items())
    out["gen_error"] = gen_error
    return out


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% (a function of the step alone: resume-safe)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _compatible(saved: dict, model_cfg: ModelConfig, train_cfg: TrainConfig, fingerprint: str) -> str | None:
    """Why ``saved`` cannot be resumed (None when it can)."""
    if saved.get("architecture") != ARCHITECTURE:
        return f"architecture {saved.get('architecture')!r} is not {ARCHITECTURE!r}"
    if saved.get("objective") != OBJECTIVE:
        return f"training objective {saved.get('objective')!r} is not {OBJECTIVE!r}"
    if saved.get("model_config") != model_cfg.as_dict():
        return f"model config differs ({saved.get('model_config')} vs {model_cfg.as_dict()})"
    ours = {k: v for k, v in train_cfg.as_dict().items() if k not in RESUMABLE_CHANGES}
    theirs = {k: v for k, v in saved.get("train_config", {}).items() if k not in RESUMABLE_CHANGES}
    if ours != theirs:
        changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        return f"training settings differ: {changed}"
    if saved.get("data_fingerprint") != fingerprint:
        return "the training set changed"
    if saved.get("step", 0) > train_cfg.steps:
        return f"it is at step {saved['step']}, beyond the requested {train_cfg.steps}"
    return None


def weights_only_value(value, where: str = "checkpoint"):
    """``value`` made of what ``torch.load(weights_only=True)`` reads: tensors, and str, int,
    float, bool and None in dicts, lists and tuples. Numeric numpy arrays become tensors,
    string arrays lists of str, numpy scalars and 0-d arrays python numbers. Anything else is a
    TypeError naming the field (``where``), raised before any file is written."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.ndim == 0 and value.dtype.kind in "biufUS":
            return value.item()
        if value.dtype.kind in "biuf":
            return torch.from_numpy(np.array(value, copy=True))
        if value.dtype.kind in "US":
            return [str(v) for v in value.tolist()]
        raise TypeError(f"geometry checkpoint field {where}: numpy array of dtype {value.dtype} cannot be stored")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"geometry checkpoint field {where}: key {key!r} ({type(key).__name__}) is not str or int")
            out[key] = weights_only_value(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(weights_only_value(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(
        f"geometry checkpoint field {where}: {type(value).__module__}.{type(value).__name__} cannot be stored "
        "(a checkpoint holds tensors, numbers, strings, None, lists, tuples and dicts only)"
    )


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write ``payload`` (tagged with ``CHECKPOINT_FORMAT``) atomically; it loads with ``weights_only=True``."""
    safe = {**weights_only_value(payload), "format": CHECKPOINT_FORMAT}
    with atomic_path(path) as tmp:
        torch.save(safe, tmp)


_UNPICKLER_REASON = re.compile(r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+|WeightsUnpickler error: [^\n]*)")


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint at ``path``, read with ``weights_only=True``.

    A file that holds anything but tensors and plain values (a crafted pickle, or a checkpoint
    of an older format, which held numpy objects) is refused with :class:`CheckpointFormatError`;
    it is never loaded with ``weights_only=False``."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNPICKLER_REASON.search(str(exc))
        raise CheckpointFormatError(
            f"geometry checkpoint {path} refused: it is not a weights-only checkpoint "
            f"({found.group(1) if found else 'not a torch weights-only file'}); loading it would run code "
            f"named in the file. Checkpoints written before format {CHECKPOINT_FORMAT!r} are refused the same "
            "way: rematerialize geometry/geometry_checkpoint with run config `restart: true`"
        ) from None
    except Exception as exc:  # re-raised with the file named: torch's own message does not say which
        raise CheckpointMismatchError(f"cannot read geometry checkpoint {path}: {exc}") from exc
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else f"a {type(saved).__name__}, not a dict"
        raise CheckpointFormatError(
            f"geometry checkpoint {path} has format {found!r}, not {CHECKPOINT_FORMAT!r} (written by an older "
            "version): rematerialize geometry/geometry_checkpoint with run config `restart: true`"
        )
    return saved


def move_aside(path: Path, label: str) -> Path:
    """Rename ``path`` to ``<name>.<label>-<UTC time>`` beside it, never replacing an existing file."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    for n in range(1000):
        target = path.with_name(f"{path.name}.{label}-{stamp}" + (f"-{n}" if n else ""))
        try:
            os.link(path, target)  # fails if target exists: no file is ever replaced
        except FileExistsError:
            continue
        path.unlink()
        return target
    raise FileExistsError(f"cannot move {path} aside: 1000 names {path.name}.{label}-{stamp}-N exist")


def load_state_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is an error naming them."""
    parts = state_dict_mismatch(model.state_dict(), state)
    if parts:
        raise CheckpointMismatchError(f"checkpoint {source} does not fit this geometry model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def checkpoint_sigma_gen(saved: dict, source: str) -> float:
    """The generator's RMS error a checkpoint's refiner is matched to; an error naming ``source``
    for checkpoints written before noise-matched training (they have none)."""
    value = saved.get("sigma_gen")
    if value is None or not math.isfinite(float(value)):
        raise CheckpointMismatchError(
            f"geometry checkpoint {source} has no sigma_gen (the generator's error that sets refinement's "
            f"noise levels; got {value!r}): it predates noise-matched training; rematerialize geometry_checkpoint"
        )
    return float(value)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GeometryModel, dict]:
    """The model a checkpoint describes, with its weights; (model, checkpoint dict)."""
    saved = read_checkpoint(path)
    if saved.get("architecture") != ARCHITECTURE:
        raise CheckpointMismatchError(
            f"checkpoint {path} is architecture {saved.get('architecture')!r}, this code builds {ARCHITECTURE!r}"
        )
    model = GeometryModel(ModelConfig(**saved["model_config"]))
    load_state_strict(model, saved["model"], str(path))
    return model.to(device).eval(), saved


def train(
    ts: GeometryTrainingSet,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    checkpoint_path: str | Path,
    fingerprint: str,
    device: torch.device | str = "cpu",
    amp: bool = False,
    log: Callable[[str], None] = print,
    extra: dict | None = None,
    restart: bool = False,
    warn: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or resume) until ``cfg.steps``; the final state is in ``checkpoint_path``.

    ``extra`` is stored in the checkpoint (e.g. the frozen encoder and the slides). An existing
    checkpoint that cannot be resumed raises :class:`IncompatibleCheckpointError` unless
    ``restart``; with ``restart`` any existing checkpoint is moved aside (:func:`move_aside`),
    reported through ``warn`` (default ``log``), and training starts fresh.
    """
    warn = warn or log
    device = torch.device(device)
    checkpoint_path = Path(checkpoint_path)
    torch.manual_seed(cfg.seed)
    model = GeometryModel(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    step, history, seconds_before, note = 0, [], 0.0, "no checkpoint found: fresh start"
    sigma_gen: float | None = None  # running mean of the generator's RMS error (noise matching)

    restarted_from_incompatible, moved_aside_to = False, None
    if checkpoint_path.is_file():
        try:
            saved = read_checkpoint(checkpoint_path)
            why_not = _compatible(saved, model_cfg, cfg, fingerprint)
        except CheckpointMismatchError as exc:  # unreadable, crafted or of an older format: not resumable
            saved, why_not = None, str(exc)
        if why_not is not None and not restart:
            raise IncompatibleCheckpointError(
                f"geometry checkpoint {checkpoint_path} cannot be resumed: {why_not}. The file is kept as it is; to "
                "train from scratch, rematerialize geometry/geometry_checkpoint with run config `restart: true` "
                "(the old file is then moved aside, not overwritten)"
            )
        if why_not is not None:
            moved_aside_to = move_aside(checkpoint_path, "incompatible")
            restarted_from_incompatible = True
            note = f"existing checkpoint not resumed ({why_not}); restart requested: moved to {moved_aside_to}, fresh start"
            warn(f"geometry training: {note}")
        elif restart:
            moved_aside_to = move_aside(checkpoint_path, "restart")
            note = f"restart requested: checkpoint at step {saved['step']} moved to {moved_aside_to}, fresh start"
            warn(f"geometry training: {note}")
        else:
            load_state_strict(model, saved["model"], str(checkpoint_path))
            optimizer.load_state_dict(saved["optimizer"])
            generator.set_state(saved["rng_state"])
            step, history = int(saved["step"]), list(saved["history"])
            sigma_gen = saved.get("sigma_gen")
            seconds_before = float(saved.get("seconds", 0.0))
            note = f"resumed from step {step}"
            log(f"geometry training: {note}")
    resumed_from = step

    train_sets, sd = ts.train, ts.sigma_data
    n_sets = len(train_sets.size)

    def payload() -> dict:
        return {
            "architecture": ARCHITECTURE, "objective": OBJECTIVE, "model_config": model_cfg.as_dict(), "train_config": cfg.as_dict(),
            "data_fingerprint": fingerprint, "sigma_data": sd, "sigma_gen": sigma_gen, "dims": ts.dims, "step": step,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng_state": generator.get_state(),
            "history": history, "seconds": seconds_before + (time.perf_counter() - started), **(extra or {}),
        }

    started = time.perf_counter()
    last: dict = history[-1] if history else {}
    model.train()
    while step < cfg.steps:
        rows = torch.randint(n_sets, (cfg.batch_size,), generator=generator).numpy()
        feats, target, mask = set_batch(ts, train_sets, rows, device)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        parts = compute_losses(model, feats, target, mask, sd, cfg, generator, device, amp, sigma_gen)
        values = {k: float(v.detach()) for k, v in parts.items()}
        if math.isfinite(values["gen_error"]):
            sigma_gen = values["gen_error"] if sigma_gen is None else (
                cfg.sigma_gen_momentum * sigma_gen + (1 - cfg.sigma_gen_momentum) * values["gen_error"])
        if not all(math.isfinite(v) for v in values.values()):
            kept = f"last good checkpoint {checkpoint_path} is kept" if checkpoint_path.is_file() else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"geometry training stopped: non-finite loss at step {step + 1} "
                f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())}); {kept}"
            )
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            last = {"step": step, **{k: round(v, 6) for k, v in values.items()}}
            history.append(last)
            log(f"geometry step {step}/{cfg.steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(checkpoint_path, payload())
    return TrainResult(step, resumed_from, note, seconds_before + time.perf_counter() - started, last, history, sigma_gen,
                       restarted_from_incompatible, None if moved_aside_to is None else str(moved_aside_to))

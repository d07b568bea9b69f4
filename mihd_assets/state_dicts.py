"""Strict state-dict loading with an answer a user can act on: which keys are missing,
unexpected or mis-shaped (torch's own error lists everything, or, with ``strict=False``,
nothing at all). Shared by every family that loads a checkpoint."""

from __future__ import annotations


def _listed(items: list[str], limit: int) -> str:
    return f"{items[:limit]}{' ...' if len(items) > limit else ''}"


def state_dict_mismatch(own: dict, state: dict, limit: int = 8) -> list[str]:
    """Why ``state`` cannot load strictly into a model whose state dict is ``own``: one phrase
    each for missing keys, unexpected keys and shape mismatches (empty when it fits)."""
    # In the model's (and the file's) own order: the first keys listed are the first layers.
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys {_listed(missing, limit)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {_listed(unexpected, limit)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches {_listed(shapes, limit)}")
    return parts

"""Inference (generator, refiner, full sampler), metrics and baselines on held-out sets.

Every method is scored on the same held-out sets with the same metrics:

* ``scale_ratio``: RMS(pred) / RMS(target) (1 = right scale);
* ``knn_jaccard``: mean over points of |kNN_pred ∩ kNN_true| / |kNN_pred ∪ kNN_true| at k;
* ``distance_spearman``: Spearman correlation of all pairwise distances;
* ``trustworthiness``: sklearn's trustworthiness at k (are predicted neighbours true ones).

Methods: ``generator``; ``refined`` (generator -> noise at sigma_refine -> a few Heun
steps from sqrt(sigma_refine^2 + sigma_gen^2) down to refine_stop_factor x sigma_gen);
``full_sampler`` (Heun from sigma_max: diagnostic); ``denoiser`` one step from the
noised target, per sigma bin (the per-sigma scale table); baselines
``random`` (Gaussian coordinates at the training scale) and ``expression_spectral``
(spectral embedding of the set's expression kNN graph, rescaled to the training scale).
The baselines' scale comes from the training targets, never from the held-out target.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .config import SIGMA_BINS, SIGMAS_PER_BIN, GeometryPlan, sigma_bin_label
from .edm import heun_sample, karras_sigmas, sampler_range
from .models import GeometryModel, canonical_frame, centre
from .targets import GeometryInputError, GeometrySets, GeometryTrainingSet
from .train import autocast, denoiser_target, set_batch


def _check_k(n: int, k: int, what: str) -> None:
    if n < k + 1:
        raise GeometryInputError(f"{what}@{k} needs a set of at least {k + 1} points, got {n}")


def knn_sets(points: np.ndarray, k: int) -> np.ndarray:
    """Indices of each point's k nearest other points, (n, k)."""
    d = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def knn_jaccard(pred: np.ndarray, true: np.ndarray, k: int = 10) -> float:
    _check_k(len(true), k, "Jaccard")
    a, b = knn_sets(pred, k), knn_sets(true, k)
    scores = [len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(a, b)]
    return float(np.mean(scores))


def distance_spearman(pred: np.ndarray, true: np.ndarray) -> float:
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    dp, dt = pdist(pred), pdist(true)
    if np.ptp(dp) == 0 or np.ptp(dt) == 0:
        return float("nan")
    return float(spearmanr(dp, dt).statistic)


def trustworthiness_at(pred: np.ndarray, true: np.ndarray, k: int = 10) -> float:
    from sklearn.manifold import trustworthiness

    if len(true) <= 2 * k:
        raise GeometryInputError(f"trustworthiness@{k} needs a set of more than {2 * k} points, got {len(true)}")
    return float(trustworthiness(true, pred, n_neighbors=k))


def scale_ratio(pred: np.ndarray, true: np.ndarray) -> float:
    def rms(x):
        return float(np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean()))

    return rms(pred) / rms(true)


def set_metrics(pred: np.ndarray, true: np.ndarray, k: int) -> dict[str, float]:
    return {
        "scale_ratio": scale_ratio(pred, true),
        "knn_jaccard": knn_jaccard(pred, true, k),
        "distance_spearman": distance_spearman(pred, true),
        "trustworthiness": trustworthiness_at(pred, true, k),
    }


def random_baseline(n: int, dims: int, rms_target: float, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, rms_target / np.sqrt(dims), size=(n, dims))


def spectral_baseline(features: np.ndarray, dims: int, k: int, rms_target: float, seed: int) -> np.ndarray:
    """Spectral embedding of the expression kNN graph, rescaled to ``rms_target``."""
    from sklearn.manifold import SpectralEmbedding

    emb = SpectralEmbedding(n_components=dims, affinity="nearest_neighbors", n_neighbors=k, random_state=seed)
    out = emb.fit_transform(features)
    out = out - out.mean(axis=0)
    radius = np.sqrt((out**2).sum(axis=1).mean())
    return out * (rms_target / radius) if radius > 0 else out


@dataclass
class Inference:
    """Runs a trained model on padded sets."""

    model: GeometryModel
    sigma_data: float
    device: torch.device
    sigma_gen: float  # the generator's RMS error (train.TrainConfig.generator_noise_matching)
    amp: bool = False

    def _denoise(self, context, v_init, mask):
        def fn(x, sigma):
            with autocast(self.device, self.amp):
                return self.model.denoiser(x, sigma, context, v_init, mask, self.sigma_data).float()
        return fn

    def _noise(self, shape, mask, generator) -> torch.Tensor:
        return centre(torch.randn(shape, generator=generator).to(self.device), mask)

    @torch.no_grad()
    def generate(self, feats, mask) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.amp):
            context, v = self.model(feats, mask)
        return context.float(), canonical_frame(v, mask)

    def refine_schedule(self, sigma_refine: float, steps: int, sigma_stop: float) -> torch.Tensor:
        """Noise levels of refinement: the noisy estimate carries the added noise and the
        generator's own error, sqrt(sigma_refine^2 + sigma_gen^2); the steps end at sigma_stop."""
        start = math.hypot(sigma_refine, self.sigma_gen)
        return karras_sigmas(steps, min(sigma_stop, start), start)

    @torch.no_grad()
    def refine(self, context, v_init, mask, sigma_refine: float, steps: int, sigma_stop: float,
               generator: torch.Generator) -> torch.Tensor:
        x = v_init + sigma_refine * self._noise(v_init.shape, mask, generator)
        return heun_sample(self._denoise(context, v_init, mask), x, self.refine_schedule(sigma_refine, steps, sigma_stop))

    @torch.no_grad()
    def full_sample(self, context, v_init, mask, sigma_min: float, sigma_max: float, steps: int,
                    generator: torch.Generator) -> torch.Tensor:
        x = sigma_max * self._noise(v_init.shape, mask, generator)
        return heun_sample(self._denoise(context, v_init, mask), x, karras_sigmas(steps, sigma_min, sigma_max))

    @torch.no_grad()
    def denoise_once(self, context, v_init, target, mask, sigma: float, generator: torch.Generator) -> torch.Tensor:
        # The denoiser works in the generator's frame (see train.denoiser_target); the metrics
        # are rotation-invariant, so comparing with the unrotated target is unaffected.
        target = denoiser_target(target, v_init, mask)
        x = target + sigma * self._noise(target.shape, mask, generator)
        sig = torch.full((target.shape[0],), sigma, device=self.device)
        return self._denoise(context, v_init, mask)(x, sig)


def refine_stop(plan: GeometryPlan, sigma_data: float, sigma_gen: float) -> float:
    """Where refinement's steps end: ``refine_stop_factor`` x sigma_gen, never below the sampler's floor."""
    return max(plan.sigma_min_factor * sigma_data, plan.refine_stop_factor * sigma_gen)


def _aggregate(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    keys = ["slide_id", "method", "sigma_bin", "sigma_lo", "sigma_hi"]
    metrics = ["scale_ratio", "knn_jaccard", "distance_spearman", "trustworthiness"]
    frame[["sigma_lo", "sigma_hi"]] = frame[["sigma_lo", "sigma_hi"]].fillna(-1.0)
    agg = frame.groupby(keys, sort=False).agg(
        n_sets=("set", "nunique"), n_evaluations=("set", "size"), mean_set_size=("n_points", "mean"),
        sigma=("sigma", "mean"), **{m: (m, "mean") for m in metrics}, knn_jaccard_std=("knn_jaccard", "std"),
    ).reset_index()
    agg[["sigma_lo", "sigma_hi"]] = agg[["sigma_lo", "sigma_hi"]].replace(-1.0, np.nan)
    return agg


def evaluate(model: GeometryModel, ts: GeometryTrainingSet, plan: GeometryPlan, device, amp: bool = False,
             batch_size: int = 16, log=print, *, sigma_gen: float) -> pd.DataFrame:
    """Metrics of every method on every held-out set, averaged per (slide, method, sigma bin).

    ``sigma_gen`` is the generator's RMS error stored in the checkpoint (refinement's schedule)."""
    device = torch.device(device)
    model = model.to(device).eval()
    sd, k, dims = ts.sigma_data, plan.knn_k, ts.dims
    rms_target = sd * np.sqrt(dims)  # mean RMS radius of the *training* targets
    sigma_min, sigma_max = sampler_range(sd, plan.sigma_min_factor, plan.sigma_max_factor)
    sigma_refine = plan.sigma_refine_factor * sd
    sigma_stop = refine_stop(plan, sd, sigma_gen)
    inf = Inference(model, sd, device, sigma_gen=sigma_gen, amp=amp)
    generator = torch.Generator().manual_seed(plan.seed)
    rng = np.random.default_rng(plan.seed)
    sets: GeometrySets = ts.heldout
    small = sets.size[sets.size < 2 * k + 1]
    if len(small):
        raise GeometryInputError(
            f"held-out sets must have more than {2 * k} points for kNN metrics at k={k}; smallest has {int(small.min())}"
        )
    rows: list[dict] = []
    started = time.perf_counter()
    for start in range(0, len(sets.size), batch_size):
        batch = np.arange(start, min(start + batch_size, len(sets.size)))
        feats, target, mask = set_batch(ts, sets, batch, device)
        context, v_gen = inf.generate(feats, mask)
        outputs: dict[tuple, torch.Tensor] = {
            ("generator", None, None, None): v_gen,
            ("refined", None, None, sigma_refine): inf.refine(context, v_gen, mask, sigma_refine, plan.refine_steps, sigma_stop, generator),
            ("full_sampler", None, None, sigma_max): inf.full_sample(context, v_gen, mask, sigma_min, sigma_max, plan.sampler_steps, generator),
        }
        for (lo, hi), sigmas in zip(SIGMA_BINS, SIGMAS_PER_BIN):
            for sigma in sigmas:
                outputs[("denoiser", lo, hi, sigma)] = inf.denoise_once(context, v_gen, target, mask, sigma, generator)
        for j, set_row in enumerate(batch):
            n = int(sets.size[set_row])
            slide = ts.slides[int(sets.slide[set_row])]
            true = target[j, :n].cpu().numpy().astype(np.float64)
            base = {"slide_id": slide.slide_id, "set": int(set_row), "n_points": n}
            for (method, lo, hi, sigma), out in outputs.items():
                rows.append({**base, "method": method, "sigma_lo": lo, "sigma_hi": hi, "sigma": sigma,
                             "sigma_bin": sigma_bin_label(lo, hi) if lo is not None else "",
                             **set_metrics(out[j, :n].cpu().numpy().astype(np.float64), true, k)})
            feats_np = feats[j, :n].cpu().numpy()
            for method, pred in (
                ("random", random_baseline(n, dims, rms_target, rng)),
                ("expression_spectral", spectral_baseline(feats_np, dims, k, rms_target, plan.seed)),
            ):
                rows.append({**base, "method": method, "sigma_lo": None, "sigma_hi": None, "sigma": None,
                             "sigma_bin": "", **set_metrics(pred, true, k)})
        log(f"geometry evaluation: {batch[-1] + 1}/{len(sets.size)} held-out sets ({time.perf_counter() - started:.1f} s)")
    return _aggregate(rows)

"""Synthetic ROSMAP-style immunofluorescence tiles with a known donor-level answer.

Layout written under ``root`` (the lab's ROSMAP tile layout):

* ``tiles/<projid>/<projid>_<MARKER>_<n>_b0c0.tif`` (DAPI) and ``..._b0c1.tif`` (marker),
  16-bit, one pair per tile; a stray ``<projid>_<MARKER>_1_metadata.xml`` in every donor
  folder and one corrupt ``_b0c1.tif`` (not a TIFF) in one donor;
* ``annotations/<projid>/<projid>_<MARKER>_<n>_masks.tif``: nucleus instance masks
  (0 background, 1..N) for an annotated subset (tile 1 of each marker of every donor);
* ``clinical.csv``: ``projid`` and the eight outcomes coded as in the ROSMAP codebook
  (one ``braaksc`` of 9 = missing, one empty ``cogdx``);
* ``truth.json``: the planted answer (which outcomes follow the marker-positive ratio).

Each donor has a latent pathology score ``z``. Its marker-positive probability rises with
``z``; ``braaksc``, ``nft`` and ``gpath`` rise with ``z`` and ``ceradsc`` falls with it
(lower = worse), while ``cogdx``, ``dcfdx_lv``, ``plaq_d`` and ``plaq_n`` ignore it.
Output is deterministic for a given spec; a manifest lets a second call skip the work.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage as ndi
from scipy import stats

from ..fileio import atomic_path, atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
OUTCOMES = ("braaksc", "ceradsc", "cogdx", "dcfdx_lv", "plaq_d", "plaq_n", "nft", "gpath")
PLANTED = ("braaksc", "ceradsc", "nft", "gpath")
NULL = ("cogdx", "dcfdx_lv", "plaq_d", "plaq_n")


@dataclass(frozen=True)
class RosmapDemoSpec:
    """Sizes of the synthetic cohort. Defaults are the demo profile's sizes."""

    n_donors: int = 32
    tiles_per_donor: int = 4  # tiles of the main marker (E5 counts these)
    other_marker_tiles: int = 1  # tiles of a second marker (annotated, used in E0-E2)
    marker: str = "GFAP"
    other_marker: str = "OLIG2"
    tile_px: int = 128
    cells_per_tile: int = 22
    radius_px: tuple[float, float] = (4.5, 7.5)
    seed: int = 4
    corrupt_donor_index: int = 2  # this donor's last main-marker tile has a corrupt marker file


def tiny_spec() -> RosmapDemoSpec:
    """A smaller cohort for tests (still enough donors for a Spearman test)."""
    return RosmapDemoSpec(n_donors=12, tiles_per_donor=2, tile_px=96, cells_per_tile=12, seed=5)


def donor_ids(spec: RosmapDemoSpec) -> list[str]:
    rng = np.random.default_rng(spec.seed)
    ids = 10_000_000 + np.sort(rng.choice(80_000_000, size=spec.n_donors, replace=False))
    return [str(int(i)) for i in ids]


def synth_tile(rng: np.random.Generator, size: int, n_cells: int, radius: tuple[float, float], p_positive: float):
    """One two-channel tile: (dapi uint16, marker uint16, nucleus labels int32, positive flags).

    Nuclei are non-touching ellipses; positive cells carry a marker halo two pixels wider
    than their nucleus (a cytoplasmic stain), negative cells only background.
    """
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    n = 0
    for _ in range(n_cells * 12):
        if n >= n_cells:
            break
        r = rng.uniform(*radius)
        cy, cx = rng.uniform(0, size, 2)
        squash, angle = rng.uniform(0.75, 1.0), rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        inside = (u / r) ** 2 + (v / (r * squash)) ** 2 <= 1
        if inside.sum() < 20 or (labels[ndi.binary_dilation(inside, iterations=2)] > 0).any():
            continue
        n += 1
        labels[inside] = n
    brightness = np.concatenate([[0.0], rng.uniform(1200, 2500, n)])
    dapi = ndi.gaussian_filter(rng.normal(200, 30, labels.shape) + brightness[labels], 1.0)
    dapi += rng.normal(0, 40, labels.shape)
    positive = np.concatenate([[False], rng.random(n) < p_positive])
    halo = ndi.grey_dilation(labels, size=5)
    stain = np.concatenate([[0.0], rng.uniform(800, 1400, n)]) * positive
    marker = ndi.gaussian_filter(rng.normal(150, 30, labels.shape) + stain[halo], 1.5)
    to16 = lambda a: np.clip(a, 0, 65535).astype(np.uint16)  # noqa: E731
    return to16(dapi), to16(marker), labels, positive[1:]


def _donor_table(spec: RosmapDemoSpec, ids: list[str]) -> pd.DataFrame:
    rng = np.random.default_rng(spec.seed + 1)
    n = len(ids)
    z = rng.normal(0, 1, n)
    p_positive = 0.1 + 0.5 / (1 + np.exp(-1.5 * z))
    braaksc = np.clip(np.round(3 + 1.6 * z + rng.normal(0, 0.6, n)), 0, 6)
    ceradsc = np.clip(np.round(2.5 - 1.0 * z + rng.normal(0, 0.5, n)), 1, 4)
    cogdx = rng.choice([1, 2, 3, 4, 5, 6], size=n, p=[0.35, 0.2, 0.05, 0.3, 0.05, 0.05]).astype(float)
    agree = rng.random(n) < 0.8
    dcfdx_lv = np.where(agree, cogdx, rng.choice([1, 2, 4], size=n)).astype(float)
    plaq_d = rng.gamma(2.0, 0.3, n)
    plaq_n = rng.gamma(2.0, 0.3, n)
    nft = 0.5 * np.exp(0.9 * z + rng.normal(0, 0.3, n))
    gpath = (plaq_d + plaq_n + nft) / 3
    table = pd.DataFrame({
        "projid": ids, "braaksc": braaksc, "ceradsc": ceradsc, "cogdx": cogdx, "dcfdx_lv": dcfdx_lv,
        "plaq_d": plaq_d.round(4), "plaq_n": plaq_n.round(4), "nft": nft.round(4), "gpath": gpath.round(4),
    })
    table["z"] = z
    table["p_positive"] = p_positive
    return table


def _write_tiff(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _spec_hash(spec: RosmapDemoSpec) -> str:
    return hashlib.sha256(json.dumps({"v": GENERATOR_VERSION, **asdict(spec)}, sort_keys=True).encode()).hexdigest()[:16]


def generate_rosmap_demo(root: str | Path, spec: RosmapDemoSpec | None = None) -> dict:
    """Write the cohort under ``root`` (idempotent); returns the summary in ``manifest.json``."""
    spec = spec or RosmapDemoSpec()
    root = Path(root)
    manifest_path = root / "manifest.json"
    digest = _spec_hash(spec)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("spec_hash") == digest:
            return manifest
    ids = donor_ids(spec)
    donors = _donor_table(spec, ids)
    rng = np.random.default_rng(spec.seed + 2)
    n_tiles = n_annotated = 0
    for i, row in donors.iterrows():
        donor = row["projid"]
        tile_dir, mask_dir = root / "tiles" / donor, root / "annotations" / donor
        plan = [(spec.marker, k) for k in range(1, spec.tiles_per_donor + 1)]
        plan += [(spec.other_marker, k) for k in range(1, spec.other_marker_tiles + 1)]
        for marker, k in plan:
            # The second marker is unrelated to pathology: a fixed positive fraction.
            p = row["p_positive"] if marker == spec.marker else 0.3
            dapi, stain, labels, _ = synth_tile(rng, spec.tile_px, spec.cells_per_tile, spec.radius_px, p)
            stem = f"{donor}_{marker}_{k}"
            _write_tiff(tile_dir / f"{stem}_b0c0.tif", dapi)
            if i == spec.corrupt_donor_index and marker == spec.marker and k == spec.tiles_per_donor:
                atomic_write_bytes(tile_dir / f"{stem}_b0c1.tif", b"II*\x00 truncated by a failed copy")
            else:
                _write_tiff(tile_dir / f"{stem}_b0c1.tif", stain)
            n_tiles += 1
            if k == 1:
                _write_tiff(mask_dir / f"{stem}_masks.tif", labels.astype(np.uint16))
                n_annotated += 1
        atomic_write_text(
            tile_dir / f"{donor}_{spec.marker}_1_metadata.xml",
            f'<?xml version="1.0"?><Image donor="{donor}" channels="DAPI,{spec.marker}"/>\n',
        )
    clinical = donors[["projid", *OUTCOMES]].astype({"projid": str}).copy()
    # Codebook quirks: braaksc 9 = missing; an empty cogdx.
    clinical["braaksc"] = clinical["braaksc"].astype(int).astype(str)
    clinical.loc[1, "braaksc"] = "9"
    for col in ("ceradsc", "cogdx", "dcfdx_lv"):
        clinical[col] = clinical[col].astype(int).astype(str)
    clinical.loc[3, "cogdx"] = ""
    with atomic_path(root / "clinical.csv") as tmp:
        clinical.to_csv(tmp, index=False)
    true_rho = {
        o: float(stats.spearmanr(donors["p_positive"], donors[o]).statistic) for o in OUTCOMES
    }
    truth = {
        "planted": list(PLANTED),
        "null": list(NULL),
        "rho_true_positive_probability": true_rho,
        "marker": spec.marker,
        "corrupt_tile": f"{ids[spec.corrupt_donor_index]}_{spec.marker}_{spec.tiles_per_donor}_b0c1.tif",
    }
    atomic_write_text(root / "truth.json", json.dumps(truth, indent=2))
    manifest = {
        "spec_hash": digest,
        "spec": asdict(spec),
        "n_donors": len(ids),
        "n_tiles": n_tiles,
        "n_annotated": n_annotated,
        "donors": ids,
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    log.info("ROSMAP demo: %d donors, %d tiles, %d annotated, under %s", len(ids), n_tiles, n_annotated, root)
    return manifest

"""Synthetic Visium slides of a layered cortex, written in the real 10x / spatialLIBD layout.

Each slide is a curved cortical ribbon (L1-L6 and white matter) on the Visium hexagonal
grid. Both modalities carry the layers: every layer has its own marker genes in the
counts, and its own nucleus density, nucleus size and stain tint in the H&E-like image.
A few "spatial program" genes vary smoothly along the ribbon and across its depth (as
areal and laminar gradients do in real cortex), the same way on every slide, so that
expression says where a spot lies within its layer too (the geometry family needs that).

Files per slide (``<root>/<slide>/``), as Space Ranger 1.x + spatialLIBD would leave them:

* ``filtered_feature_bc_matrix.h5`` (10x HDF5, in-tissue spots only)
* ``spatial/tissue_positions_list.csv`` (no header; every grid position)
* ``spatial/scalefactors_json.json``
* ``spatial/tissue_hires_image.png`` / ``tissue_lowres_image.png`` (the full-resolution
  image resized by exactly their scale factors)
* ``<slide>_full_image.tif`` (full resolution, tiled, so it can be read lazily)
* ``metadata.tsv`` (spatialLIBD style, ``layer_guess_reordered``)

Coordinates in the positions file are full-resolution pixels. Output is deterministic
for a given spec; a manifest lets a second call skip slides that are already written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

GENERATOR_VERSION = "5"
LAYERS = ("Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM")
# Relative thickness of each layer across the cortical ribbon (L3 and WM are thick).
LAYER_WIDTHS = np.array([0.08, 0.08, 0.18, 0.10, 0.15, 0.16, 0.25])
# Known DLPFC layer markers, used as names so the demo reads naturally in marker plots.
LAYER_MARKERS = {
    "Layer1": ["RELN", "AQP4", "GFAP", "CXCL14", "MT1G", "FABP7"],
    "Layer2": ["HPCAL1", "CUX2", "LAMP5", "CALB1", "WFS1", "INHBA"],
    "Layer3": ["CARTPT", "ENC1", "SERPINE2", "CUX1", "LINC00507", "NEFL"],
    "Layer4": ["RORB", "NEFH", "PVALB", "SCN4B", "KCNS1", "SYT2"],
    "Layer5": ["PCP4", "BCL11B", "FEZF2", "TRABD2A", "HTR2C", "SMYD2"],
    "Layer6": ["NR4A2", "CCN2", "SEMA3E", "TLE4", "FOXP2", "SYT6"],
    "WM": ["MBP", "MOBP", "PLP1", "MAG", "CNP", "OLIG2"],
}
# Image texture per layer: nuclei per 10,000 px^2, nucleus radius (px at full res),
# eosin tint (RGB). Values chosen so neighbouring layers differ visibly.
LAYER_TEXTURE = {
    "Layer1": (1.5, 3, (236, 176, 204)),
    "Layer2": (9.0, 3, (226, 160, 196)),
    "Layer3": (5.0, 4, (230, 168, 200)),
    "Layer4": (10.0, 3, (222, 154, 192)),
    "Layer5": (4.0, 6, (228, 164, 198)),
    "Layer6": (8.0, 4, (220, 150, 190)),
    "WM": (2.0, 3, (240, 190, 214)),
}
BACKGROUND_RGB = (243, 241, 246)
HEMATOXYLIN_RGB = (86, 56, 138)


@dataclass(frozen=True)
class DemoSlideSpec:
    """Size and signal of one synthetic slide. Defaults are the demo profile's sizes."""

    # v5: 48 x 36 (was 28 x 56): about as many spots, but the layers run across 48 rows, so the
    # thinnest are 3-4 spots thick instead of 2 (real DLPFC: 5-15). At 28 rows graph-smoothing
    # methods (STAIG's GCN, the 15-neighbour vote) merged the thin layers for demo reasons, not
    # the method's (benchmarks/RESULTS.md, "staig_fusion and the demo slide's shape").
    n_rows: int = 48  # Visium array rows (the real chip has 78)
    n_cols: int = 36  # Visium array columns (the real chip has 128)
    pitch_px: float = 100.0  # full-res px between neighbouring spot centres
    spot_diameter_px: float = 55.0
    margin_px: int = 260
    hires_scalef: float = 0.2
    lowres_scalef: float = 0.06
    n_genes: int = 3500
    mean_umi: float = 3000.0
    marker_fold: float = 3.0
    dispersion: float = 6.0  # negative-binomial size parameter
    unlabelled_fraction: float = 0.01
    # Layer modules: beyond the named markers, each layer raises a block of anonymous genes a
    # little (real DLPFC layers differ in hundreds of genes, not six), so the layers stand
    # out of the noise of 3,000 scaled HVGs in PCA as they do on real slides.
    module_genes_per_layer: int = 60
    # v4: 3.0 (was 2.2): at 2.2 the layers were so faint in 30 PCs that mclust's EEE fit
    # collapsed on one of three slides (ARI 0.42, six clusters spent on outliers)
    module_fold: float = 3.0
    # Smooth spatial programs: genes peaking at points along the ribbon, and at depths across it.
    n_along_programs: int = 16
    n_depth_programs: int = 8
    program_fold: float = 4.0  # peak / baseline expression of a program gene
    program_share: float = 0.15  # share of a spot's expected counts at the programs' baseline


def slide_ids(n_slides: int) -> list[str]:
    return [f"demo_{i + 1:02d}" for i in range(n_slides)]


def _grid(spec: DemoSlideSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    rows, cols = np.meshgrid(np.arange(spec.n_rows), np.arange(spec.n_cols), indexing="ij")
    keep = (rows + cols) % 2 == 0  # Visium's hexagonal packing
    rows, cols = rows[keep], cols[keep]
    x = spec.margin_px + cols * spec.pitch_px / 2.0
    y = spec.margin_px + rows * spec.pitch_px * np.sqrt(3) / 2.0
    width = int(np.ceil(x.max() + spec.margin_px))
    height = int(np.ceil(y.max() + spec.margin_px))
    return rows, cols, x, y, width, height


class _Geometry:
    """Tissue outline and cortical depth as functions of full-res (x, y)."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, margin: float):
        self.cx, self.cy = width / 2.0, height / 2.0
        self.rx = (width - 2 * margin) / 2.0 * rng.uniform(0.92, 1.0)
        self.ry = (height - 2 * margin) / 2.0 * rng.uniform(0.92, 1.0)
        self.angle = rng.uniform(-0.35, 0.35)
        self.wave_amp = rng.uniform(0.05, 0.12)
        self.wave_freq = rng.uniform(0.8, 1.6)
        self.wave_phase = rng.uniform(0, 2 * np.pi)
        widths = LAYER_WIDTHS * rng.uniform(0.85, 1.15, size=len(LAYER_WIDTHS))
        self.edges = np.concatenate([[0.0], np.cumsum(widths / widths.sum())])

    def in_tissue(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = (x - self.cx) / self.rx, (y - self.cy) / self.ry
        return np.abs(u) ** 4 + np.abs(v) ** 4 <= 1.0  # rounded rectangle

    def frame(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(along the ribbon, about -1..1; depth: 0 at the pial surface, 1 deep in white matter, unclipped)."""
        u, v = (x - self.cx) / self.rx, (y - self.cy) / self.ry
        along = u * np.cos(self.angle) + v * np.sin(self.angle)
        across = -u * np.sin(self.angle) + v * np.cos(self.angle)
        across = across + self.wave_amp * np.sin(self.wave_freq * np.pi * along + self.wave_phase)
        return along, (across + 1.0) / 2.0

    def depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.frame(x, y)[1]

    def layer_index(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        d = np.clip(self.depth(x, y), 0.0, 1.0 - 1e-9)
        return np.searchsorted(self.edges, d, side="right") - 1


def _program_names(spec: DemoSlideSpec) -> list[str]:
    return [f"PROGA{i + 1:02d}" for i in range(spec.n_along_programs)] + [
        f"PROGD{i + 1:02d}" for i in range(spec.n_depth_programs)
    ]


def _gene_names(spec: DemoSlideSpec) -> list[str]:
    markers = [g for layer in LAYERS for g in LAYER_MARKERS[layer]]
    programs = _program_names(spec)
    fixed = len(markers) + len(programs)
    if spec.n_genes < fixed + 10:
        raise ValueError(f"n_genes must be at least {fixed + 10}, got {spec.n_genes}")
    return markers + programs + [f"DEMOG{i:05d}" for i in range(spec.n_genes - fixed)]


def _program_tuning(along: np.ndarray, depth: np.ndarray, spec: DemoSlideSpec) -> np.ndarray:
    """(n_spots, n_programs) expression multipliers in [1, program_fold]: Gaussian bumps at evenly
    spaced points along the ribbon, then at evenly spaced depths."""
    bumps = []
    if spec.n_along_programs:
        centres = np.linspace(-1.1, 1.1, spec.n_along_programs)
        bumps.append(np.exp(-0.5 * ((along[:, None] - centres[None, :]) / 0.22) ** 2))
    if spec.n_depth_programs:
        centres = np.linspace(0.0, 1.0, spec.n_depth_programs)
        bumps.append(np.exp(-0.5 * ((depth[:, None] - centres[None, :]) / 0.12) ** 2))
    if not bumps:
        return np.ones((len(along), 0))
    return 1.0 + (spec.program_fold - 1.0) * np.hstack(bumps)


def _counts(
    rng: np.random.Generator, layer_idx: np.ndarray, spec: DemoSlideSpec, along: np.ndarray, depth: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    names = _gene_names(spec)
    n_spots = len(layer_idx)
    base = rng.lognormal(mean=0.0, sigma=1.0, size=spec.n_genes)
    fold = np.ones((len(LAYERS), spec.n_genes))
    for li, layer in enumerate(LAYERS):
        for gi, gene in enumerate(names):
            if gene in LAYER_MARKERS[layer]:
                fold[li, gi] = spec.marker_fold
                for nb in (li - 1, li + 1):  # gradients across layer borders, as in real cortex
                    if 0 <= nb < len(LAYERS):
                        fold[nb, gi] = max(fold[nb, gi], 1.0 + (spec.marker_fold - 1.0) / 3.0)
    n_markers = sum(len(v) for v in LAYER_MARKERS.values())
    first_module = n_markers + spec.n_along_programs + spec.n_depth_programs
    for li in range(len(LAYERS)):
        start = first_module + li * spec.module_genes_per_layer
        fold[li, start : min(start + spec.module_genes_per_layer, spec.n_genes)] = spec.module_fold
    profile = base[None, :] * fold[layer_idx]
    programs = slice(n_markers, n_markers + spec.n_along_programs + spec.n_depth_programs)
    profile[:, programs] = 0.0
    profile *= (1.0 - spec.program_share) / profile.sum(axis=1, keepdims=True)
    # Program genes share one baseline on every slide (no per-slide draw), so they mean the same everywhere.
    n_programs = programs.stop - programs.start
    if n_programs:
        profile[:, programs] = spec.program_share / n_programs * _program_tuning(along, depth, spec)
    library = spec.mean_umi * rng.lognormal(mean=0.0, sigma=0.35, size=n_spots)
    mean = profile * library[:, None]
    # Negative binomial as a gamma-Poisson mixture.
    lam = rng.gamma(shape=spec.dispersion, scale=mean / spec.dispersion)
    return rng.poisson(lam).astype(np.int32), names


def _render_image(rng: np.random.Generator, geo: _Geometry, width: int, height: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation, gaussian_filter

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tissue = geo.in_tissue(xx, yy)
    layer = np.where(tissue, geo.layer_index(xx, yy), -1)
    del xx, yy

    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = BACKGROUND_RGB
    nuclei = np.zeros((height, width), dtype=bool)
    for li, name in enumerate(LAYERS):
        density, radius, tint = LAYER_TEXTURE[name]
        where = layer == li
        n_px = int(where.sum())
        if n_px == 0:
            continue
        img[where] = tint
        flat = np.flatnonzero(where.ravel())
        n_nuclei = int(density * n_px / 10_000)
        centres = np.zeros(height * width, dtype=bool)
        centres[rng.choice(flat, size=min(n_nuclei, n_px), replace=False)] = True
        r = np.arange(-radius, radius + 1)
        disk = (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2
        nuclei |= binary_dilation(centres.reshape(height, width), structure=disk) & where
    if (layer == LAYERS.index("WM")).any():
        # Myelinated fibres: faint streaks running along the ribbon.
        wm = layer == LAYERS.index("WM")
        stripes = 0.5 + 0.5 * np.sin(np.arange(height, dtype=np.float32)[:, None] / 3.0)
        img[wm] *= (0.95 + 0.05 * np.broadcast_to(stripes, (height, width))[wm])[:, None]
    img[nuclei] = HEMATOXYLIN_RGB
    img[tissue] += rng.normal(0.0, 6.0, size=(int(tissue.sum()), 3)).astype(np.float32)
    img = gaussian_filter(img, sigma=(0.8, 0.8, 0))
    return np.clip(img + rng.normal(0.0, 1.5, size=img.shape), 0, 255).astype(np.uint8)


def _write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    import h5py
    import scipy.sparse as sp

    mat = sp.csc_matrix(counts.T)  # 10x stores features x barcodes, compressed by column
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("matrix")
            g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
            g.create_dataset("data", data=mat.data.astype(np.int32), compression="gzip")
            g.create_dataset("indices", data=mat.indices.astype(np.int64), compression="gzip")
            g.create_dataset("indptr", data=mat.indptr.astype(np.int64))
            g.create_dataset("shape", data=np.array(mat.shape, dtype=np.int32))
            feat = g.create_group("features")
            feat.create_dataset("_all_tag_keys", data=np.array([b"genome"], dtype="S"))
            feat.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(genes), dtype="S"))
            feat.create_dataset("genome", data=np.array([b"GRCh38_demo"] * len(genes), dtype="S"))
            feat.create_dataset("id", data=np.array([f"ENSGDEMO{i:07d}" for i in range(len(genes))], dtype="S"))
            feat.create_dataset("name", data=np.array(genes, dtype="S"))


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def write_demo_slide(folder: str | Path, slide_id: str, seed: int, spec: DemoSlideSpec = DemoSlideSpec()) -> dict:
    """Write one synthetic slide into ``folder``; returns a summary of what was written."""
    import tifffile

    folder = Path(folder)
    spatial = folder / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, cols, x, y, width, height = _grid(spec)
    geo = _Geometry(rng, width, height, spec.margin_px)
    in_tissue = geo.in_tissue(x, y)
    barcodes = [f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(len(x))]

    lines = [
        f"{b},{int(t)},{r},{c},{int(round(py))},{int(round(px))}"
        for b, t, r, c, px, py in zip(barcodes, in_tissue, rows, cols, x, y)
    ]
    atomic_write_text(spatial / "tissue_positions_list.csv", "\n".join(lines) + "\n")

    idx = np.flatnonzero(in_tissue)
    layer_idx = geo.layer_index(x[idx], y[idx])
    along, depth = geo.frame(x[idx], y[idx])
    counts, genes = _counts(rng, layer_idx, spec, along, depth)
    tissue_barcodes = [barcodes[i] for i in idx]
    _write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, tissue_barcodes, genes)

    labels = np.array([LAYERS[i] for i in layer_idx], dtype=object)
    unlabelled = rng.random(len(labels)) < spec.unlabelled_fraction
    labels[unlabelled] = "NA"
    meta_lines = ["barcode\tsample_name\tlayer_guess_reordered"] + [
        f"{b}\t{slide_id}\t{lab}" for b, lab in zip(tissue_barcodes, labels)
    ]
    atomic_write_text(folder / "metadata.tsv", "\n".join(meta_lines) + "\n")

    image = _render_image(rng, geo, width, height)
    with atomic_path(folder / f"{slide_id}_full_image.tif") as tmp:
        tifffile.imwrite(tmp, image, tile=(256, 256), compression="zlib", photometric="rgb")
    _write_png(spatial / "tissue_hires_image.png", _resize(image, spec.hires_scalef))
    _write_png(spatial / "tissue_lowres_image.png", _resize(image, spec.lowres_scalef))

    factors = {
        "spot_diameter_fullres": spec.spot_diameter_px,
        "fiducial_diameter_fullres": spec.spot_diameter_px * 1.5,
        "tissue_hires_scalef": spec.hires_scalef,
        "tissue_lowres_scalef": spec.lowres_scalef,
    }
    atomic_write_text(spatial / "scalefactors_json.json", json.dumps(factors, indent=2))
    return {
        "slide_id": slide_id,
        "n_positions": int(len(x)),
        "n_spots": int(len(idx)),
        "n_genes": len(genes),
        "image_px": [height, width],
        "layer_counts": {LAYERS[i]: int((layer_idx == i).sum()) for i in range(len(LAYERS))},
    }


def generate_demo_slides(
    root: str | Path, n_slides: int = 3, spec: DemoSlideSpec = DemoSlideSpec(), base_seed: int = 1673,
    progress=None,
) -> list[dict]:
    """Write ``n_slides`` demo slides under ``root``; slides already written with the same
    generator version and spec are left untouched (so their files keep their timestamps
    and downstream assets stay fresh). ``progress(summary)``, when given, is called as each
    slide is ready (about 11 s per demo slide on two CPU cores)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    summaries = []
    for i, sid in enumerate(slide_ids(n_slides)):
        folder = root / sid
        manifest_path = folder / ".demo_manifest.json"
        wanted = {"generator_version": GENERATOR_VERSION, "seed": base_seed + i, "spec": asdict(spec)}
        if manifest_path.is_file():
            existing = json.loads(manifest_path.read_text())
            if {k: existing.get(k) for k in wanted} == wanted:
                summaries.append(existing["summary"])
                if progress:
                    progress(existing["summary"])
                continue
        log.info("writing demo slide %s into %s", sid, folder)
        summary = write_demo_slide(folder, sid, base_seed + i, spec)
        atomic_write_text(manifest_path, json.dumps({**wanted, "summary": summary}, indent=2))
        summaries.append(summary)
        if progress:
            progress(summary)
    return summaries


def tiny_spec(**overrides) -> DemoSlideSpec:
    """A very small slide for unit tests (same generator, fewer spots and pixels)."""
    base = DemoSlideSpec(n_rows=14, n_cols=28, pitch_px=60.0, spot_diameter_px=33.0, margin_px=150, n_genes=120)
    return replace(base, **overrides)

"""The geometry family's demo data: an expression-only cell dataset with hidden positions.

Made from the geometry plan's first held-out demo slide (``demo_03``: the demo checkpoint
never trains on it), each spot on tissue split into two cells with their own counts
(:func:`cells.cells_from_slide`), positions only in ``obsm["spatial_truth"]``, the layer
labels as ``obs["cell_type"]``. Written to ``<demo root>/cells/<slide>_cells.h5ad``; a second
call with the same slide and settings leaves the file alone (so its placement stays fresh).
"""

from __future__ import annotations

import json

DEMO_CELLS_VERSION = "1"
CELLS_PER_SPOT = 2
SEED = 0


def demo_dataset_name(slide_id: str) -> str:
    return f"{slide_id}_cells"


def write_demo_data() -> str:
    from mihd_resources import settings

    from ..fileio import atomic_write_text
    from ..slides.io import read_slide
    from .cells import CellSplit, cells_from_slide, write_cells
    from .config import geometry_plan

    slide = geometry_plan().heldout_slides[0]
    source = settings.demo_root() / "visium" / slide
    if not source.is_dir():
        raise FileNotFoundError(f"demo cell dataset: the held-out slide {slide} is not a demo slide under "
                                f"{source.parent}; write the demo slides first (mihd demo-data)")
    root = settings.demo_root() / "cells"
    name = demo_dataset_name(slide)
    target = root / f"{name}.h5ad"
    manifest = root / f".{name}.manifest.json"
    slide_manifest = source / ".demo_manifest.json"
    wanted = {
        "version": DEMO_CELLS_VERSION, "slide": slide, "cells_per_spot": CELLS_PER_SPOT, "seed": SEED,
        "slide_manifest": json.loads(slide_manifest.read_text()) if slide_manifest.is_file() else None,
    }
    if target.is_file() and manifest.is_file() and json.loads(manifest.read_text()) == wanted:
        return f"demo cell dataset {target} up to date"
    cells = cells_from_slide(read_slide(source, slide), slide, CellSplit(CELLS_PER_SPOT, SEED))
    write_cells(cells, target)
    atomic_write_text(manifest, json.dumps(wanted, indent=1))
    return (f"demo cell dataset {target}: {cells.n_obs} cells from the {cells.uns['cells_from_slide']['n_spots']} "
            f"spots of held-out slide {slide}, positions hidden in obsm['spatial_truth']")

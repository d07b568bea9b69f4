"""Demo data of the segmentation family: a synthetic ROSMAP cohort (tiles, masks, clinical table).

Idempotent: the generator skips an unchanged cohort. `mihd demo` then materializes E0-E5 on
it with the same planner as every other family.
"""

from __future__ import annotations

from mihd_resources import settings

DEMO_FOLDER = "rosmap"


def write_demo_data() -> str:
    from mihd_assets.demo.rosmap import generate_rosmap_demo

    root = settings.demo_root() / DEMO_FOLDER
    if settings.tiles_root() != root / "tiles":
        raise ValueError(f"MIHD_TILES_ROOT points at {settings.tiles_root()}; the segmentation demo writes and "
                         f"runs on its own data under {root} only - unset it")
    manifest = generate_rosmap_demo(root)
    return f"{manifest['n_donors']} donors, {manifest['n_tiles']} tiles, {manifest['n_annotated']} annotated ({root})"

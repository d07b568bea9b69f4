"""E4 with micro-sam's automatic mask generator (used only when micro_sam is installed).

The checkpoint is a local file (``MIHD_MICROSAM_CHECKPOINT``, model type
``MIHD_MICROSAM_MODEL_TYPE``, default ``vit_b_lm``); nothing is downloaded. Without
micro_sam the E4 asset runs the labelled cellpose proxy in ``gating.grid_prompted_masks``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def microsam_masks(images: list[np.ndarray], points_per_side: int, device) -> list[np.ndarray]:
    """Instance masks from micro-sam's AMG with a ``points_per_side`` grid, per [3, H, W] image."""
    from micro_sam.instance_segmentation import AutomaticMaskGenerator, mask_data_to_segmentation
    from micro_sam.util import get_sam_model

    checkpoint = os.environ.get("MIHD_MICROSAM_CHECKPOINT", "")
    if not checkpoint or not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"micro_sam is installed but MIHD_MICROSAM_CHECKPOINT={checkpoint!r} is not a local checkpoint file; "
            "this platform never downloads weights"
        )
    predictor = get_sam_model(model_type=os.environ.get("MIHD_MICROSAM_MODEL_TYPE", "vit_b_lm"),
                              checkpoint_path=checkpoint, device=str(device))
    generator = AutomaticMaskGenerator(predictor, points_per_side=points_per_side)
    out = []
    for image in images:
        # micro-sam segments one grey/RGB image; the nucleus channel (DAPI, else marker) is used.
        channel = image[0] if np.any(image[0]) else image[1]
        generator.initialize(channel)
        out.append(mask_data_to_segmentation(generator.generate(), with_background=True).astype(np.int32))
    return out

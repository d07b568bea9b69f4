"""H&E | ground truth | prediction panels, drawn from stored labels and the stored image
(spot coordinates alone for a slide without a stored image)."""

from __future__ import annotations

import io

import numpy as np


def _colors(labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    import matplotlib

    names = sorted({str(v) for v in labels})
    cmap = matplotlib.colormaps["tab20"]
    lookup = {name: cmap(i % 20) for i, name in enumerate(names)}
    return np.asarray([lookup[str(v)] for v in labels]), names


# Title of the first panel of a slide without any image: the spots where they lie, no pixels.
NO_IMAGE_PANEL = "no image: spot coordinates only"


def slide_panels_figure(image: np.ndarray | None, xy_image: np.ndarray, truth, prediction: np.ndarray, title: str,
                        dpi: int = 72, image_title: str | None = None):
    """A matplotlib figure with three panels: the H&E image, spots coloured by truth, by prediction.

    ``xy_image`` are the spot positions in ``image`` pixels (full-res coordinates times that
    image's scale factor); without truth labels the middle panel says so. Without an image
    (``image`` None) the first panel shows the spot positions alone, titled ``image_title``
    (default :data:`NO_IMAGE_PANEL`), and every panel is drawn in spot coordinates.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), dpi=dpi)
    spot_size = max(2.0, 4000.0 / max(len(prediction), 1))
    for ax in axes:
        if image is not None:
            ax.imshow(image)
        ax.set_axis_off()
    if image is not None:
        axes[0].set_title("H&E")
    else:
        axes[0].scatter(xy_image[:, 0], xy_image[:, 1], c="0.55", s=spot_size, linewidths=0)
        axes[0].set_title(image_title or NO_IMAGE_PANEL)
    if truth is not None:
        known = np.asarray([t is not None and str(t) != "nan" for t in truth])
        colors, _ = _colors(np.asarray(truth, dtype=object)[known])
        axes[1].scatter(xy_image[known, 0], xy_image[known, 1], c=colors, s=spot_size, linewidths=0)
        axes[1].set_title("ground truth")
    else:
        axes[1].set_title("ground truth: none for this slide")
    colors, _ = _colors(prediction)
    axes[2].scatter(xy_image[:, 0], xy_image[:, 1], c=colors, s=spot_size, linewidths=0)
    axes[2].set_title("prediction")
    if image is None:
        # Image rows grow downwards: flip y so the spots sit as they would on the image.
        for ax in axes:
            ax.invert_yaxis()
            ax.set_aspect("equal")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def slide_panels_png(image: np.ndarray | None, xy_image: np.ndarray, truth, prediction: np.ndarray, title: str,
                     dpi: int = 72, image_title: str | None = None) -> bytes:
    """:func:`slide_panels_figure` as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = slide_panels_figure(image, xy_image, truth, prediction, title, dpi=dpi, image_title=image_title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()

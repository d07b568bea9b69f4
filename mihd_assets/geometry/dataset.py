"""From slides (AnnData) to a geometry training set: encode expression, sample sets, targets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from .config import GeometryPlan, GeometrySize
from .encoder import fit_shared_pca, standardize_embeddings
from .targets import GeometryInputError, GeometryTrainingSet, SlideData, assemble_training_set, slide_units

if TYPE_CHECKING:
    import anndata as ad


def _coordinate_units(adata: ad.AnnData, slide_id: str) -> str:
    """The unit of ``obsm["spatial"]`` the slide's reader recorded in
    ``uns["spatial"][slide]["metadata"]["coordinate_units"]``; "unrecorded" without it."""
    meta = adata.uns.get("spatial", {}).get(slide_id, {}).get("metadata", {})
    return str(meta.get("coordinate_units", "unrecorded"))


def build_training_set(adatas: Mapping[str, ad.AnnData], plan: GeometryPlan, size: GeometrySize,
                       embeddings: Mapping[str, tuple[np.ndarray, list[str]]] | None = None
                       ) -> GeometryTrainingSet:
    """The training set of ``plan``, with the frozen encoder's state (stored with the checkpoint).

    ``adatas`` holds every training and held-out slide (coordinates in ``obsm["spatial"]``);
    ``embeddings`` (values, obs_names) per slide when the encoder is a stored gene embedding.
    """
    wanted = list(plan.train_slides) + list(plan.heldout_slides)
    missing = [s for s in wanted if s not in adatas]
    if missing:
        raise GeometryInputError(f"geometry slides {missing} were not loaded (have {sorted(adatas)})")
    for sid in wanted:
        if adatas[sid].n_obs < size.set_size_min:
            raise GeometryInputError(
                f"slide {sid}: {adatas[sid].n_obs} spots, fewer than the smallest set ({size.set_size_min}) of size '{size.name}'"
            )
    if plan.gene_encoder == "shared_pca":
        enc = fit_shared_pca({s: adatas[s] for s in plan.train_slides}, {s: adatas[s] for s in wanted},
                             plan.pca_genes, plan.pca_components, plan.seed, plan.min_shared_genes)
        features = {s: enc.transform(adatas[s], s) for s in wanted}
        encoder_info, encoder_state = enc.describe(), {"kind": "shared_pca", **enc.state()}
    else:
        if embeddings is None:
            raise GeometryInputError(f"gene encoder '{plan.gene_encoder}' needs its stored embeddings")
        aligned = {}
        for s in wanted:
            values, obs = embeddings[s]
            order = {b: i for i, b in enumerate(obs)}
            absent = [b for b in adatas[s].obs_names if b not in order]
            if absent:
                raise GeometryInputError(f"slide {s}: {len(absent)} spots have no '{plan.gene_encoder}' embedding (first: {absent[:3]})")
            aligned[s] = np.asarray(values)[[order[b] for b in adatas[s].obs_names]]
        features, encoder_info = standardize_embeddings(plan.gene_encoder, aligned, list(plan.train_slides))
        encoder_state = {"kind": f"embedding:{plan.gene_encoder}"}
    slides = []
    for sid in wanted:
        coords, radius = slide_units(adatas[sid].obsm["spatial"], sid)
        split = "train" if sid in plan.train_slides else "heldout"
        slides.append(SlideData(sid, split, features[sid], coords, radius, list(map(str, adatas[sid].obs_names))))
    info = {
        "encoder": encoder_info,
        "size": size.name,
        "set_size": [size.set_size_min, size.set_size_max],
        "n_spots": {s.slide_id: len(s.obs_names) for s in slides},
        "coordinates": "obsm['spatial'] / slide RMS radius (slide units)",
        # fullres_px (Visium, or an .h5ad with scale factors) or "file units" (an .h5ad without).
        "coordinate_units": {sid: _coordinate_units(adatas[sid], sid) for sid in wanted},
        "seed": plan.seed,
    }
    ts = assemble_training_set(slides, plan.dims, size.n_sets_train, size.n_sets_heldout,
                               size.set_size_min, size.set_size_max, plan.seed, info)
    ts.encoder = encoder_state
    return ts

import numpy as np
import pytest
import torch

from mihd_assets.segmentation import cellpose_api as api

from .conftest import changed_weights


def test_unknown_model_name_or_missing_path_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(api.CellposeWeightsError, match="neither an existing file nor a known cellpose model name"):
        api.resolve_weights("cpsam_typo")
    with pytest.raises(api.CellposeWeightsError, match="neither an existing file"):
        api.resolve_weights(tmp_path / "missing.pt")
    # A known name resolves only to a local copy: no download, no silent default.
    monkeypatch.setattr(api.cp_models, "MODEL_DIR", tmp_path)
    with pytest.raises(api.CellposeWeightsError, match="has no local copy .* never downloads"):
        api.resolve_weights("cpsam")
    (tmp_path / "cpsam").write_bytes(b"x")
    assert api.resolve_weights("cpsam") == tmp_path / "cpsam"


def test_random_tiny_network_round_trips_strictly(tmp_path):
    path = tmp_path / "tiny.pt"
    sha = api.save_random_network(path, api.TINY_CONFIG, seed=3)
    loaded = api.load_model(path)
    assert loaded.config == api.TINY_CONFIG and loaded.sha256 == sha
    assert isinstance(loaded.net, api.CPSAM)  # the package's own network class
    api.save_random_network(tmp_path / "again.pt", api.TINY_CONFIG, seed=3)
    state = torch.load(path, weights_only=True)
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)  # deterministic for a seed
    state["encoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(api.CellposeWeightsError, match=r"does not match the tiny CPSAM network: 1 unexpected keys \[.encoder\.extra\.weight.\]"):
        api.load_model(tmp_path / "extra.pt")


def test_non_cellpose4_state_dict_is_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "cp3.pt")
    with pytest.raises(api.CellposeWeightsError, match="not a cellpose 4"):
        api.load_model(tmp_path / "cp3.pt")


def _disk_image(n_cells: int, size: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_cells):
        cy, cx = 8 + 16 * (i // 4), 8 + 16 * (i % 4)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = i + 1
    dapi = (labels > 0) * 1000.0 + rng.normal(100, 10, labels.shape)
    return np.stack([dapi, dapi * 0.1, np.zeros_like(dapi)]).astype(np.float32), labels


def test_train_counts_min_train_masks_drops_and_segment_shapes(tmp_path):
    base = tmp_path / "base.pt"
    api.save_random_network(base, api.TINY_CONFIG)
    data = [_disk_image(n, seed=n) for n in (6, 2, 8)]
    # Two epochs: cellpose's learning rate warms up from 0, so a one-epoch run changes no weight
    # (only the stored mean label diameter, `diam_labels`).
    result = api.train(base, [d[0] for d in data], [d[1] for d in data], tmp_path / "out.pt", n_epochs=2, learning_rate=1e-3,
                       weight_decay=0.01, batch_size=2, min_train_masks=5, seed=0)
    assert result.dropped == [1] and result.n_images_used == 2 and result.n_images_given == 3
    assert result.sha256 == api.file_sha256(tmp_path / "out.pt") and len(result.train_losses) == 2
    assert changed_weights(base, tmp_path / "out.pt") > 0
    images = [d[0].copy() for d in data[:2]]
    masks = api.segment(api.load_model(tmp_path / "out.pt"), images)
    np.testing.assert_array_equal(images[0], data[0][0])  # raw intensities survive cellpose's normalization
    assert [m.shape for m in masks] == [(64, 64), (64, 64)] and masks[0].dtype == np.int32
    with pytest.raises(ValueError, match="no training image has >= min_train_masks=5"):
        api.train(base, [data[1][0]], [data[1][1]], tmp_path / "none.pt", n_epochs=1, learning_rate=1e-3, weight_decay=0.0,
                  batch_size=1, min_train_masks=5, seed=0)
    with pytest.raises(ValueError, match=r"expected a channel-first \[3, H, W\]"):
        api.segment(api.load_model(base), [np.zeros((64, 64, 3), np.float32)])


def test_budget_runs_fine_tune_each_budget_and_seed_and_score_the_test_set(tmp_path):
    import logging
    from dataclasses import replace

    from mihd_assets.segmentation.budget import budget_runs
    from mihd_assets.segmentation.plan import SegmentationPlan
    from mihd_assets.segmentation.split import CellposeSet

    base = tmp_path / "base.pt"
    api.save_random_network(base, api.TINY_CONFIG)
    train = [_disk_image(n, seed=n) for n in (6, 7, 8)]
    test = [_disk_image(6, seed=9)]
    records = lambda d, p: [{"image_id": f"{p}{i}", "marker": "GFAP"} for i in range(len(d))]  # noqa: E731
    train_set = CellposeSet([d[0] for d in train], [d[1] for d in train], records(train, "tr"))
    test_set = CellposeSet([d[0] for d in test], [d[1] for d in test], records(test, "te"))
    plan = replace(SegmentationPlan(), n_epochs=2, learning_rate=1e-3, batch_size=2, budgets=(2, 3), budget_seeds=(0, 1))
    runs, frames, drops = budget_runs(logging.getLogger("e2"), plan, {"path": str(base), "config": "tiny", "weights": "random"},
                                      train_set, test_set, ["te0"], "cpu", "demo", lambda name: tmp_path / f"{name}.pt")
    assert [(r["budget"], r["seed"]) for r in runs] == [(2, 0), (2, 1), (3, 0), (3, 1)] and drops == 0
    # Each run's file is the checkpoint it reports, every run moved the weights, and runs on
    # different image subsets trained different weights.
    assert [api.file_sha256(tmp_path / f"{r['model']}.pt") for r in runs] == [r["sha256"] for r in runs]
    assert all(changed_weights(base, tmp_path / f"{r['model']}.pt") for r in runs)
    subsets = {}
    for r in runs:
        subsets.setdefault(tuple(r["images"]), r["sha256"])
    assert len(subsets) >= 2 and len(set(subsets.values())) == len(subsets)
    assert [len(r["images"]) for r in runs] == [2, 2, 3, 3]
    assert all(set(f["variant"]) == {r["model"]} and "ap50" in f for f, r in zip(frames, runs))

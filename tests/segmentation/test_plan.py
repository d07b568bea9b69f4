"""The E0-E5 plan: the demo profile's sizes and the overrides a user may set."""

import pytest

from mihd_assets.segmentation.plan import SegmentationPlan, plan_for_profile


def test_demo_profile_shrinks_seeds_and_replicates_but_keeps_the_budgets(monkeypatch):
    monkeypatch.delenv("MIHD_SEG_EPOCHS", raising=False)
    demo, full = plan_for_profile("demo"), plan_for_profile("full")
    assert full == SegmentationPlan()
    assert demo.budgets == full.budgets and len(demo.budget_seeds) < len(full.budget_seeds)
    assert demo.bootstrap_replicates < full.bootstrap_replicates


def test_one_training_epoch_is_refused_because_it_trains_nothing(monkeypatch):
    monkeypatch.setenv("MIHD_SEG_EPOCHS", "1")
    with pytest.raises(ValueError, match=r"at least 2 epochs \(MIHD_SEG_EPOCHS=1\)"):
        plan_for_profile("demo")
    monkeypatch.setenv("MIHD_SEG_EPOCHS", "2")
    assert plan_for_profile("demo").n_epochs == 2

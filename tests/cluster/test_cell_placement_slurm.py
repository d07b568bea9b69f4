"""geometry/cell_placement with `executor: slurm` on the real one-node Slurm cluster: the job runs
the placement's compute and the layout equals the local run's, value for value (CPU on both sides)."""

from __future__ import annotations

import numpy as np

from mihd_assets.geometry.cells import write_cells
from mihd_resources.orchestration import step_errors
from mihd_resources.step_executor import StepExecutor
from tests.cluster.test_slurm_executor import slurm, slurm_env  # noqa: F401  (fixtures)
from tests.geometry.test_cell_placement_assets import home, place, placed  # noqa: F401  (fixture and helpers)


def test_cell_placement_on_slurm_equals_the_local_run(slurm, slurm_env, home):  # noqa: F811
    root, _, resources, cells = home
    write_cells(cells, root / "cells" / "on_local.h5ad")
    write_cells(cells, root / "cells" / "on_slurm.h5ad")
    local = place(home, "on_local")
    assert local.success, step_errors(local)
    remote = place(home, "on_slurm",
                   resources={**resources, "step_executor": StepExecutor(executor="slurm", slurm_config=slurm_env())})
    assert remote.success, step_errors(remote)
    meta = {k: getattr(v, "value", v) for k, v in
            remote.asset_materializations_for_node("geometry__cell_placement")[0].metadata.items()}
    assert meta["executor"] == "slurm" and meta["slurm_state"] == "COMPLETED" and meta["slurm_node"] == slurm.host
    assert slurm.job_state(meta["slurm_job_id"]) == "COMPLETED"
    np.testing.assert_array_equal(placed(home, "on_slurm").obsm["X_geometry"], placed(home, "on_local").obsm["X_geometry"])

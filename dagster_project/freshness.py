"""What needs materializing: the rule shared by the backfill schedule and `mihd materialize`.

An asset partition is planned when it is missing, when its code version changed, when its
input files changed (assets that read the data root record an ``input_fingerprint``), or
when anything upstream of it is planned or was materialized after it. A partition whose
slide failed the blocking ``spots_on_tissue`` check (and whose files have not changed
since) is reported as blocked instead of being retried forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from dagster import AssetKey, AssetMaterialization, AssetRecordsFilter, DagsterInstance

CODE_VERSION_TAG = "dagster/code_version"


@dataclass
class PartitionPlan:
    partition_key: str
    to_materialize: list[AssetKey] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    blocked: str | None = None


def latest_materialization(
    instance: DagsterInstance, key: AssetKey, partition_key: str | None
) -> tuple[int, AssetMaterialization] | None:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition_key] if partition_key else None),
        limit=1,
        ascending=False,
    ).records
    if not records:
        return None
    record = records[0]
    return record.storage_id, record.asset_materialization


def _metadata_value(mat: AssetMaterialization, name: str):
    entry = mat.metadata.get(name)
    return getattr(entry, "value", entry)


def plan_partition(
    instance: DagsterInstance,
    keys_in_order: list[AssetKey],
    parents: Mapping[AssetKey, set[AssetKey]],
    code_versions: Mapping[AssetKey, str | None],
    partition_key: str | None,
    fingerprints: Mapping[AssetKey, Callable[[str], str]] | None = None,
    gates: Mapping[AssetKey, str] | None = None,
) -> PartitionPlan:
    """Decide which of ``keys_in_order`` (topologically sorted) to materialize.

    ``fingerprints`` maps assets that read raw files to a function giving the current
    fingerprint of their partition's files; ``gates`` maps assets to the boolean metadata
    entry that says their blocking check passed.
    """
    fingerprints = fingerprints or {}
    gates = gates or {}
    plan = PartitionPlan(partition_key or "")
    latest: dict[AssetKey, int] = {}
    for key in keys_in_order:
        found = latest_materialization(instance, key, partition_key)
        name = key.to_user_string()
        reason = None
        if found is None:
            reason = "missing"
        else:
            storage_id, mat = found
            latest[key] = storage_id
            if mat.tags.get(CODE_VERSION_TAG) != code_versions.get(key):
                reason = f"code version {mat.tags.get(CODE_VERSION_TAG)} -> {code_versions.get(key)}"
            elif key in fingerprints and partition_key is not None:
                current = fingerprints[key](partition_key)
                if _metadata_value(mat, "input_fingerprint") != current:
                    reason = "input files changed"
            if reason is None:
                for parent in parents.get(key, ()):
                    if parent in plan.to_materialize:
                        reason = f"upstream {parent.to_user_string()} is planned"
                        break
                    if parent in latest and latest[parent] > storage_id:
                        reason = f"upstream {parent.to_user_string()} is newer"
                        break
            if reason is None and key in gates and _metadata_value(mat, gates[key]) is False:
                plan.blocked = f"{name} failed its blocking check; fix the input files to retry"
                return plan
        if reason is not None:
            plan.to_materialize.append(key)
            plan.reasons[name] = reason
    return plan


def plan_for_graph(
    instance: DagsterInstance,
    asset_graph,
    keys: set[AssetKey],
    partition_key: str | None,
    fingerprints: Mapping[AssetKey, Callable[[str], str]] | None = None,
    gates: Mapping[AssetKey, str] | None = None,
) -> PartitionPlan:
    """:func:`plan_partition` over ``keys`` of a resolved asset graph (Definitions or repository)."""
    ordered = [k for k in asset_graph.toposorted_asset_keys if k in keys]
    parents = {k: set(asset_graph.get(k).parent_keys) & keys for k in ordered}
    code_versions = {k: asset_graph.get(k).code_version for k in ordered}
    return plan_partition(instance, ordered, parents, code_versions, partition_key, fingerprints, gates)

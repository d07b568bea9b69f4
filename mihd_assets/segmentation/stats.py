"""E5 donor-level statistics: codebook-checked clinical outcomes, donor ratios, Spearman
with Benjamini-Hochberg FDR, and a vectorised tile bootstrap.

The donor ratio is sum(marker-positive cells) / sum(cells) over the donor's tiles, not a
mean of tile ratios (tiles with few cells would weigh as much as full ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

OUTCOMES = ("braaksc", "ceradsc", "cogdx", "dcfdx_lv", "plaq_d", "plaq_n", "nft", "gpath")
DONOR_ID = "projid"
MISSING_TOKENS = {"", "na", "nan", "n/a", ".", "null", "none"}


@dataclass(frozen=True)
class Code:
    """Valid values of one outcome (ROSMAP codebook): a set of integer codes, or continuous
    >= 0; ``missing`` codes mean 'not assessed' and become NaN."""

    valid: frozenset[int] | None
    missing: frozenset[int] = frozenset()


CODEBOOK = {
    "braaksc": Code(frozenset(range(0, 7)), frozenset({8, 9})),
    "ceradsc": Code(frozenset({1, 2, 3, 4})),
    "cogdx": Code(frozenset(range(1, 7))),
    "dcfdx_lv": Code(frozenset(range(1, 7))),
    "plaq_d": Code(None),
    "plaq_n": Code(None),
    "nft": Code(None),
    "gpath": Code(None),
}


@dataclass
class ClinicalTable:
    values: pd.DataFrame  # index: donor id (str); columns: outcomes as float, NaN = missing
    missing_counts: dict[str, int]  # per outcome: values read as missing (blank or missing code)


def clean_clinical(frame: pd.DataFrame, source: str | Path, outcomes=OUTCOMES) -> ClinicalTable:
    """Check a clinical table against the codebook; every problem names file, column, donor and value."""
    if DONOR_ID not in frame.columns:
        raise ValueError(f"clinical table {source}: no donor id column {DONOR_ID!r} (columns: {list(frame.columns)})")
    absent = [o for o in outcomes if o not in frame.columns]
    if absent:
        raise ValueError(f"clinical table {source}: missing outcome column(s) {absent} (columns: {list(frame.columns)})")
    ids = frame[DONOR_ID].astype(str).str.strip()
    duplicated = sorted(set(ids[ids.duplicated()]))
    if duplicated:
        raise ValueError(f"clinical table {source}: donor id(s) {duplicated} appear more than once")
    out = pd.DataFrame(index=pd.Index(ids, name=DONOR_ID))
    missing_counts = {}
    for outcome in outcomes:
        code = CODEBOOK[outcome]
        raw = frame[outcome].astype(str).str.strip()
        blank = raw.str.lower().isin(MISSING_TOKENS) | frame[outcome].isna().to_numpy()
        numbers = pd.to_numeric(raw.where(~blank), errors="coerce")
        bad = ~blank & numbers.isna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"clinical table {source}: column {outcome!r} has non-numeric value {raw.iloc[i]!r} "
                f"for donor {ids.iloc[i]} ({int(bad.sum())} such value(s))"
            )
        values = numbers.to_numpy(dtype=float)
        coded_missing = np.zeros(len(values), bool)
        if code.valid is not None:
            present = ~np.isnan(values)
            integral = present & (values == np.round(values))
            coded_missing = integral & np.isin(values, list(code.missing))
            invalid = present & ~coded_missing & ~(integral & np.isin(values, list(code.valid)))
            if invalid.any():
                i = int(np.flatnonzero(invalid)[0])
                raise ValueError(
                    f"clinical table {source}: column {outcome!r} has value {raw.iloc[i]!r} for donor "
                    f"{ids.iloc[i]}, outside the codebook {sorted(code.valid)} (missing codes: {sorted(code.missing)})"
                )
        else:
            negative = values < 0
            if np.any(negative):
                i = int(np.flatnonzero(negative)[0])
                raise ValueError(
                    f"clinical table {source}: column {outcome!r} has negative value {raw.iloc[i]!r} for donor "
                    f"{ids.iloc[i]} (a burden is >= 0)"
                )
        values[coded_missing] = np.nan
        out[outcome] = values
        missing_counts[outcome] = int(blank.sum() + coded_missing.sum())
    return ClinicalTable(out, missing_counts)


def read_clinical(path: str | Path, outcomes=OUTCOMES) -> ClinicalTable:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"clinical table {path} does not exist (set MIHD_CLINICAL)")
    return clean_clinical(pd.read_csv(path, dtype=str, keep_default_na=False), path, outcomes)


def donor_ratios(tile_counts: pd.DataFrame) -> pd.DataFrame:
    """Per donor and model: tiles, cells, positive cells and ratio = sum(positive)/sum(cells)."""
    grouped = tile_counts.groupby(["model", "donor_id"], sort=True).agg(
        n_tiles=("tile", "nunique"), n_cells=("n_cells", "sum"), n_positive=("n_positive", "sum")
    ).reset_index()
    cells = grouped["n_cells"].to_numpy(dtype=float)
    grouped["ratio"] = np.where(cells > 0, grouped["n_positive"] / np.where(cells > 0, cells, 1), np.nan)
    return grouped


def spearman_table(ratio: pd.Series, clinical: pd.DataFrame, outcomes=OUTCOMES) -> pd.DataFrame:
    """Spearman rho of donor ratio vs each outcome, BH-FDR over the testable outcomes.

    Donors without a ratio (no cells), without a clinical row or with a missing outcome
    are dropped per outcome and counted; an outcome whose remaining values are constant
    (or with fewer than 3 donors) has no test and is left out of the FDR, with a note.
    """
    rows = []
    no_clinical = sorted(set(ratio.index) - set(clinical.index))
    joined = clinical.reindex(ratio.index)
    for outcome in outcomes:
        x, y = ratio.to_numpy(dtype=float), joined[outcome].to_numpy(dtype=float)
        keep = ~np.isnan(x) & ~np.isnan(y)
        row = {
            "outcome": outcome,
            "n_donors": int(keep.sum()),
            "n_dropped": int((~keep).sum()),
            "n_no_clinical": len(no_clinical),
            "n_missing_outcome": int(np.isnan(y).sum() - len(no_clinical)),
            "n_missing_ratio": int(np.isnan(x).sum()),
            "rho": np.nan,
            "p_value": np.nan,
            "note": "",
        }
        if keep.sum() < 3:
            row["note"] = f"only {int(keep.sum())} donors with both values; not tested"
        elif np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
            row["note"] = "constant input; not tested"
        else:
            result = stats.spearmanr(x[keep], y[keep])
            row["rho"], row["p_value"] = float(result.statistic), float(result.pvalue)
        rows.append(row)
    table = pd.DataFrame(rows)
    tested = table["p_value"].notna().to_numpy()
    table["q_value"] = np.nan
    if tested.any():
        table.loc[tested, "q_value"] = stats.false_discovery_control(table.loc[tested, "p_value"].to_numpy(), method="bh")
    return table


@dataclass
class TileMatrix:
    """Tile counts of D donors padded to T tiles: cells/positives [D, T], tiles per donor [D]."""

    donors: list[str]
    cells: np.ndarray
    positives: np.ndarray
    n_tiles: np.ndarray

    @classmethod
    def from_counts(cls, tile_counts: pd.DataFrame) -> "TileMatrix":
        if tile_counts.empty:
            raise ValueError("no tile counts to bootstrap")
        donors = sorted(tile_counts["donor_id"].unique())
        groups = {d: g for d, g in tile_counts.groupby("donor_id")}
        width = max(len(g) for g in groups.values())
        cells = np.zeros((len(donors), width))
        positives = np.zeros((len(donors), width))
        n_tiles = np.zeros(len(donors), int)
        for i, donor in enumerate(donors):
            g = groups[donor]
            n_tiles[i] = len(g)
            cells[i, : len(g)] = g["n_cells"].to_numpy()
            positives[i, : len(g)] = g["n_positive"].to_numpy()
        return cls(donors, cells, positives, n_tiles)


def tiles_kept(n_tiles: np.ndarray, fraction: float) -> np.ndarray:
    """Tiles drawn per donor: ``fraction`` of its tiles rounded half up, at least one."""
    return np.maximum(1, np.floor(fraction * n_tiles + 0.5)).astype(int)


def subsample_ratios(matrix: TileMatrix, rng: np.random.Generator, n_rep: int, fraction: float):
    """``n_rep`` replicates drawing ``fraction`` of each donor's tiles without replacement.

    Returns (ratios [n_rep, D] with NaN where the drawn tiles hold no cell, selection
    [n_rep, D, T] booleans). One random key per tile; a donor keeps its k smallest keys.
    """
    d, t = matrix.cells.shape
    keys = rng.random((n_rep, d, t))
    keys[:, np.arange(t)[None, :] >= matrix.n_tiles[:, None]] = np.inf
    order = np.argsort(keys, axis=-1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(t), order.shape), axis=-1)
    selected = ranks < tiles_kept(matrix.n_tiles, fraction)[None, :, None]
    cells = np.einsum("rdt,dt->rd", selected, matrix.cells)
    positives = np.einsum("rdt,dt->rd", selected, matrix.positives)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(cells > 0, positives / cells, np.nan)
    return ratios, selected


def rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair of [R, n] arrays, ignoring positions where either is NaN
    (ranks are recomputed over the remaining positions of that row)."""
    y = np.broadcast_to(y, x.shape).astype(float).copy()
    x = x.astype(float).copy()
    invalid = np.isnan(x) | np.isnan(y)
    x[invalid] = np.nan
    y[invalid] = np.nan
    rx = stats.rankdata(x, axis=1, nan_policy="omit")
    ry = stats.rankdata(y, axis=1, nan_policy="omit")
    n = (~invalid).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rx = rx - (np.nansum(rx, axis=1) / n)[:, None]
        ry = ry - (np.nansum(ry, axis=1) / n)[:, None]
        rho = np.nansum(rx * ry, axis=1) / np.sqrt(np.nansum(rx**2, axis=1) * np.nansum(ry**2, axis=1))
    rho[n < 3] = np.nan
    return rho


def bootstrap_rhos(
    matrix: TileMatrix, outcomes: pd.DataFrame, n_boot: int, fraction: float, seed: int, chunk: int = 250
) -> np.ndarray:
    """Spearman rho per replicate and outcome, [n_boot, n_outcomes]; ``outcomes`` is indexed
    by donor (rows aligned to ``matrix.donors``; NaN = missing)."""
    values = outcomes.reindex(matrix.donors).to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, values.shape[1]))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        ratios, _ = subsample_ratios(matrix, rng, size, fraction)
        for j in range(values.shape[1]):
            out[start : start + size, j] = rowwise_spearman(ratios, values[:, j][None, :])
    return out


def bootstrap_summary(rhos: np.ndarray, rho_full: np.ndarray, outcomes: list[str], level: float = 0.95) -> pd.DataFrame:
    """Percentile CI of rho and sign consistency (share of replicates with the full-data sign)."""
    alpha = (1 - level) / 2 * 100
    rows = []
    for j, outcome in enumerate(outcomes):
        r = rhos[:, j][~np.isnan(rhos[:, j])]
        full = rho_full[j]
        rows.append({
            "outcome": outcome,
            "n_replicates": int(r.size),
            "rho_full": float(full),
            "rho_median": float(np.median(r)) if r.size else np.nan,
            "ci_low": float(np.percentile(r, alpha)) if r.size else np.nan,
            "ci_high": float(np.percentile(r, 100 - alpha)) if r.size else np.nan,
            "sign_consistency": float(np.mean(np.sign(r) == np.sign(full))) if r.size and not np.isnan(full) else np.nan,
        })
    return pd.DataFrame(rows)

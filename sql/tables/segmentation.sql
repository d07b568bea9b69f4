-- Cellpose-SAM E0-E5 (issue 6). Bookkeeping columns as in schema.sql; the metrics store
-- replaces all rows of one (asset_key, partition_key) per write.

-- E0: which split each annotated image's donor belongs to.
CREATE TABLE IF NOT EXISTS segmentation_split (
    asset_key       VARCHAR NOT NULL,
    partition_key   VARCHAR NOT NULL,
    run_id          VARCHAR NOT NULL,
    code_version    VARCHAR,
    written_at      TIMESTAMP NOT NULL,
    donor_id        VARCHAR NOT NULL,
    image_id        VARCHAR NOT NULL,
    marker          VARCHAR,
    split           VARCHAR NOT NULL,   -- train / val / test
    n_masks         INTEGER
);

-- E1/E2: every trained or loaded model, with its weights source and min_train_masks drops.
CREATE TABLE IF NOT EXISTS segmentation_models (
    asset_key          VARCHAR NOT NULL,
    partition_key      VARCHAR NOT NULL,
    run_id             VARCHAR NOT NULL,
    code_version       VARCHAR,
    written_at         TIMESTAMP NOT NULL,
    experiment         VARCHAR NOT NULL,   -- E1 / E2
    model              VARCHAR NOT NULL,   -- baseline / generic / marker_specific / marker_only / budget_<n>_seed_<s>
    init_weights       VARCHAR,            -- random / file:<sha256> (the baseline a fine-tune started from)
    weights            VARCHAR,            -- random / file:<sha256> of this model's own state dict
    config             VARCHAR,            -- cpsam / tiny
    profile            VARCHAR,            -- demo / full
    budget             INTEGER,
    seed               INTEGER,
    n_train_given      INTEGER,
    n_train_used       INTEGER,
    n_dropped_min_masks INTEGER,           -- images with < min_train_masks masks, not trained on
    min_train_masks    INTEGER,
    n_epochs           INTEGER,
    learning_rate      DOUBLE,
    final_train_loss   DOUBLE,
    seconds            DOUBLE,
    -- The fine-tune's GPU step (E1 fine-tunes, E2 runs; NULL for the baseline, loaded without one):
    -- compute.device (auto / cuda / cpu), the device it ran on (cuda / cpu), what configured a GPU ('' = nothing)
    device_requested   VARCHAR,
    device_used        VARCHAR,
    gpu_expected_by    VARCHAR
);

-- E1-E4: test-set scores per image (level = 'image') and in total (level = 'total').
CREATE TABLE IF NOT EXISTS segmentation_metrics (
    asset_key       VARCHAR NOT NULL,
    partition_key   VARCHAR NOT NULL,
    run_id          VARCHAR NOT NULL,
    code_version    VARCHAR,
    written_at      TIMESTAMP NOT NULL,
    experiment      VARCHAR NOT NULL,   -- E1 / E2 / E3 / E4
    model           VARCHAR NOT NULL,
    variant         VARCHAR NOT NULL,   -- '' / budget_<n>_seed_<s> / q2_98_a60 / pps_32
    method          VARCHAR,            -- cellpose / gating / microsam_amg / proxy:cellpose_grid_prompted
    weights         VARCHAR,            -- random / file:<sha256>
    config          VARCHAR,            -- cpsam / tiny
    profile         VARCHAR,
    budget          INTEGER,
    seed            INTEGER,
    gating          VARCHAR,            -- q0_100 / q2_98 / q5_95
    min_area        INTEGER,
    points_per_side INTEGER,
    level           VARCHAR NOT NULL,   -- image / total
    image_id        VARCHAR NOT NULL,   -- '' on total rows
    ap50            DOUBLE,
    "precision"     DOUBLE,
    recall          DOUBLE,
    f1              DOUBLE,
    tp              INTEGER,
    fp              INTEGER,
    fn              INTEGER,
    n_true          INTEGER,
    n_pred          INTEGER,
    -- The GPU step that computed the scored masks (E1: the predictions; E2: the budget runs; E3 and
    -- the E4 proxy: the generic predictions; E4 micro-sam: the sweep): as in segmentation_models
    device_requested   VARCHAR,
    device_used        VARCHAR,
    gpu_expected_by    VARCHAR
);

-- E5: cells and marker-positive cells per tile and model (one donor partition per write).
CREATE TABLE IF NOT EXISTS tile_counts (
    asset_key       VARCHAR NOT NULL,
    partition_key   VARCHAR NOT NULL,
    run_id          VARCHAR NOT NULL,
    code_version    VARCHAR,
    written_at      TIMESTAMP NOT NULL,
    donor_id        VARCHAR NOT NULL,
    model           VARCHAR NOT NULL,   -- baseline / finetuned
    model_source    VARCHAR,            -- which E1 model (baseline / generic / ...)
    weights         VARCHAR,
    config          VARCHAR,
    tile            VARCHAR NOT NULL,
    marker          VARCHAR,
    n_cells         INTEGER NOT NULL,
    n_positive      INTEGER NOT NULL,
    marker_threshold DOUBLE,
    -- The counting step (E5): as in segmentation_models
    device_requested   VARCHAR,
    device_used        VARCHAR,
    gpu_expected_by    VARCHAR
);

-- E5: tiles that were not counted, with the reason (missing channel, unreadable TIFF, ...).
CREATE TABLE IF NOT EXISTS skipped_tiles (
    asset_key       VARCHAR NOT NULL,
    partition_key   VARCHAR NOT NULL,
    run_id          VARCHAR NOT NULL,
    code_version    VARCHAR,
    written_at      TIMESTAMP NOT NULL,
    donor_id        VARCHAR NOT NULL,
    file            VARCHAR NOT NULL,
    reason          VARCHAR NOT NULL
);

-- E5: donor ratio = sum(positive) / sum(cells) over the donor's tiles.
CREATE TABLE IF NOT EXISTS donor_ratios (
    asset_key       VARCHAR NOT NULL,
    partition_key   VARCHAR NOT NULL,
    run_id          VARCHAR NOT NULL,
    code_version    VARCHAR,
    written_at      TIMESTAMP NOT NULL,
    donor_id        VARCHAR NOT NULL,
    model           VARCHAR NOT NULL,
    n_tiles         INTEGER,
    n_cells         BIGINT,
    n_positive      BIGINT,
    ratio           DOUBLE              -- NULL when the donor has no cell
);

-- E5: Spearman of donor ratio vs each outcome, BH-FDR over the tested outcomes.
CREATE TABLE IF NOT EXISTS e5_spearman (
    asset_key          VARCHAR NOT NULL,
    partition_key      VARCHAR NOT NULL,
    run_id             VARCHAR NOT NULL,
    code_version       VARCHAR,
    written_at         TIMESTAMP NOT NULL,
    model              VARCHAR NOT NULL,
    outcome            VARCHAR NOT NULL,
    n_donors           INTEGER,            -- donors with both a ratio and the outcome
    n_dropped          INTEGER,
    n_no_clinical      INTEGER,
    n_missing_outcome  INTEGER,            -- blank or missing code (e.g. braaksc 9)
    n_missing_ratio    INTEGER,
    rho                DOUBLE,
    p_value            DOUBLE,
    q_value            DOUBLE,             -- Benjamini-Hochberg over this model's outcomes
    note               VARCHAR
);

-- E5: tile-bootstrap stability (fraction of each donor's tiles per replicate).
CREATE TABLE IF NOT EXISTS e5_bootstrap (
    asset_key        VARCHAR NOT NULL,
    partition_key    VARCHAR NOT NULL,
    run_id           VARCHAR NOT NULL,
    code_version     VARCHAR,
    written_at       TIMESTAMP NOT NULL,
    model            VARCHAR NOT NULL,
    outcome          VARCHAR NOT NULL,
    n_replicates     INTEGER,            -- replicates with a defined rho
    tile_fraction    DOUBLE,
    rho_full         DOUBLE,
    rho_median       DOUBLE,
    ci_low           DOUBLE,
    ci_high          DOUBLE,
    sign_consistency DOUBLE
);

-- Databases written before the device columns existed (their rows read NULL).
ALTER TABLE segmentation_models ADD COLUMN IF NOT EXISTS device_requested VARCHAR;
ALTER TABLE segmentation_models ADD COLUMN IF NOT EXISTS device_used VARCHAR;
ALTER TABLE segmentation_models ADD COLUMN IF NOT EXISTS gpu_expected_by VARCHAR;
ALTER TABLE segmentation_metrics ADD COLUMN IF NOT EXISTS device_requested VARCHAR;
ALTER TABLE segmentation_metrics ADD COLUMN IF NOT EXISTS device_used VARCHAR;
ALTER TABLE segmentation_metrics ADD COLUMN IF NOT EXISTS gpu_expected_by VARCHAR;
ALTER TABLE tile_counts ADD COLUMN IF NOT EXISTS device_requested VARCHAR;
ALTER TABLE tile_counts ADD COLUMN IF NOT EXISTS device_used VARCHAR;
ALTER TABLE tile_counts ADD COLUMN IF NOT EXISTS gpu_expected_by VARCHAR;

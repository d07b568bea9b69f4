-- EDM geometry family (mihd_assets/geometry): held-out evaluation and training runs.

CREATE TABLE IF NOT EXISTS geometry_metrics (
    asset_key          VARCHAR NOT NULL,
    partition_key      VARCHAR NOT NULL,
    run_id             VARCHAR NOT NULL,
    code_version       VARCHAR,
    written_at         TIMESTAMP NOT NULL,
    checkpoint_id      VARCHAR NOT NULL,   -- first 16 hex of the checkpoint file's sha256
    step               INTEGER NOT NULL,   -- training step of that checkpoint
    slide_id           VARCHAR NOT NULL,   -- held-out slide
    method             VARCHAR NOT NULL,   -- generator / refined / full_sampler / denoiser / random / expression_spectral
    sigma_bin          VARCHAR NOT NULL,   -- '[lo,hi)' for the one-step denoiser, '' otherwise
    sigma_lo           DOUBLE,
    sigma_hi           DOUBLE,             -- 'inf' for the last bin
    sigma              DOUBLE,             -- mean noise level used (refined: sigma_refine; full_sampler: sigma_max)
    n_sets             INTEGER,
    n_evaluations      INTEGER,            -- sets x noise levels
    mean_set_size      DOUBLE,
    scale_ratio        DOUBLE,             -- RMS(pred) / RMS(target)
    knn_jaccard        DOUBLE,             -- mean kNN Jaccard at k
    knn_jaccard_std    DOUBLE,
    distance_spearman  DOUBLE,             -- Spearman of all pairwise distances
    trustworthiness    DOUBLE,             -- sklearn trustworthiness at k
    sigma_data         DOUBLE,
    k                  INTEGER,
    -- The evaluation step: compute.device (auto / cuda / cpu), the device it ran on (cuda / cpu),
    -- what configured a GPU for it ('' = nothing)
    device_requested   VARCHAR,
    device_used        VARCHAR,
    gpu_expected_by    VARCHAR
);

CREATE TABLE IF NOT EXISTS geometry_training_runs (
    asset_key          VARCHAR NOT NULL,
    partition_key      VARCHAR NOT NULL,
    run_id             VARCHAR NOT NULL,
    code_version       VARCHAR,
    written_at         TIMESTAMP NOT NULL,
    checkpoint_id      VARCHAR NOT NULL,
    step               INTEGER NOT NULL,
    target_steps       INTEGER,
    resumed_from_step  INTEGER,            -- 0 = trained from scratch
    sigma_data         DOUBLE,
    size               VARCHAR,            -- tiny (CPU) / full (GPU)
    n_parameters       BIGINT,
    device             VARCHAR,
    amp_dtype          VARCHAR,
    seconds            DOUBLE,             -- training time summed over resumed runs
    profile            VARCHAR,
    losses             VARCHAR,            -- JSON: last logged losses
    train_slides       VARCHAR,
    heldout_slides     VARCHAR,
    -- The training step: compute.device, the device it ran on, what configured a GPU ('' = nothing);
    -- `device` above is device_used
    device_requested   VARCHAR,
    device_used        VARCHAR,
    gpu_expected_by    VARCHAR
);
-- Databases written before the device columns existed (their rows read NULL).
ALTER TABLE geometry_metrics ADD COLUMN IF NOT EXISTS device_requested VARCHAR;
ALTER TABLE geometry_metrics ADD COLUMN IF NOT EXISTS device_used VARCHAR;
ALTER TABLE geometry_metrics ADD COLUMN IF NOT EXISTS gpu_expected_by VARCHAR;
ALTER TABLE geometry_training_runs ADD COLUMN IF NOT EXISTS device_requested VARCHAR;
ALTER TABLE geometry_training_runs ADD COLUMN IF NOT EXISTS device_used VARCHAR;
ALTER TABLE geometry_training_runs ADD COLUMN IF NOT EXISTS gpu_expected_by VARCHAR;

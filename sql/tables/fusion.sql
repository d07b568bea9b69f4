-- Fusion / clustering family: one row per slide x clustering (every matrix dimension) x
-- refinement. `clustering_method_used` differs from `clustering_method` only when a
-- configured fallback ran (never silently); `n_clusters_found` differs from
-- `n_clusters_requested` when the method left clusters empty or leiden's resolution search
-- missed the count (raw rows), or the majority vote emptied clusters (refined rows).
CREATE TABLE IF NOT EXISTS clustering_metrics (
    asset_key               VARCHAR NOT NULL,
    partition_key           VARCHAR NOT NULL,
    run_id                  VARCHAR NOT NULL,
    code_version            VARCHAR,
    written_at              TIMESTAMP NOT NULL,
    slide_id                VARCHAR NOT NULL,
    representation          VARCHAR NOT NULL,   -- what was clustered (asset name)
    kind                    VARCHAR NOT NULL,   -- gene | vision | fusion | image_only
    fusion_method           VARCHAR,            -- concat, mean, ..., staig_fusion; image-only method
    gene_encoder            VARCHAR,
    vision                  VARCHAR,            -- <encoder>_<variant>
    clustering_method       VARCHAR NOT NULL,   -- requested
    clustering_method_used  VARCHAR NOT NULL,   -- what ran
    refinement              VARCHAR NOT NULL,   -- none | majority_k<k>
    n_clusters              INTEGER,            -- requested (as n_clusters_requested; kept for older queries)
    n_clusters_source       VARCHAR,
    n_spots                 INTEGER,
    n_labelled              INTEGER,
    ari                     DOUBLE,
    nmi                     DOUBLE,
    homogeneity             DOUBLE,
    completeness            DOUBLE,
    chaos                   DOUBLE,
    pas                     DOUBLE,
    metrics_status          VARCHAR,            -- ok | skipped: <reason>
    weights                 VARCHAR,            -- random when any upstream encoder ran with random weights
    profile                 VARCHAR,
    replicate               INTEGER,            -- 0 = each method's default seed; r = default seed + r
    seed                    BIGINT,             -- the clustering's seed (trained fusions: see their metadata)
    n_clusters_requested    INTEGER,            -- clusters asked of the method
    n_clusters_found        INTEGER,            -- non-empty clusters in this row's labels (raw or refined)
    -- The GPU step behind the row (the image-only clustering itself, else the trained fusion or
    -- encoder that computed the representation; NULL when none did): compute.device
    -- (auto / cuda / cpu), the device it ran on (cuda / cpu), what configured a GPU ('' = nothing)
    device_requested        VARCHAR,
    device_used             VARCHAR,
    gpu_expected_by         VARCHAR,
    -- STAIG (image mode) representations: pseudo_label_k asked for, the k k-means used (clamped
    -- to the spot count), non-empty pseudo-labels; NULL for every other representation
    pseudo_label_k_requested INTEGER,
    pseudo_label_k_used      INTEGER,
    n_pseudo_labels          INTEGER
);
-- Databases written before replicates were a matrix dimension.
ALTER TABLE clustering_metrics ADD COLUMN IF NOT EXISTS replicate INTEGER;
ALTER TABLE clustering_metrics ADD COLUMN IF NOT EXISTS seed BIGINT;
-- Databases written before found cluster counts were recorded (their rows read NULL).
ALTER TABLE clustering_metrics ADD COLUMN IF NOT EXISTS n_clusters_requested INTEGER;
ALTER TABLE clustering_metrics ADD COLUMN IF NOT EXISTS n_clusters_found INTEGER;
-- Databases written before the device columns existed (their rows read NULL).
ALTER TABLE clustering_metrics ADD COLUMN IF NOT EXISTS device_requested VARCHAR;
ALTER TABLE clustering_metrics ADD COLUMN IF NOT EXISTS device_used VARCHAR;
ALTER TABLE clustering_metrics ADD COLUMN IF NOT EXISTS gpu_expected_by VARCHAR;
-- Databases written before STAIG's pseudo-label counts were recorded (their rows read NULL).
ALTER TABLE clustering_metrics ADD COLUMN IF NOT EXISTS pseudo_label_k_requested INTEGER;
ALTER TABLE clustering_metrics ADD COLUMN IF NOT EXISTS pseudo_label_k_used INTEGER;
ALTER TABLE clustering_metrics ADD COLUMN IF NOT EXISTS n_pseudo_labels INTEGER;

-- Cell placement (mihd_assets/geometry/placement_assets.py): one layout of a whole expression-only
-- dataset scored against its hidden positions, beside the baselines and the per-set scores.

CREATE TABLE IF NOT EXISTS cell_placement_metrics (
    asset_key          VARCHAR NOT NULL,
    partition_key      VARCHAR NOT NULL,   -- the cell dataset
    run_id             VARCHAR NOT NULL,
    code_version       VARCHAR,
    written_at         TIMESTAMP NOT NULL,
    dataset_id         VARCHAR NOT NULL,
    checkpoint_id      VARCHAR NOT NULL,   -- first 16 hex of the checkpoint file's sha256
    checkpoint_step    INTEGER,
    scope              VARCHAR NOT NULL,   -- whole: one layout of every cell; per_set: mean over placement sets
    method             VARCHAR NOT NULL,   -- geometry (joined layout) / geometry_set_estimate (the model's estimate of one set) / random / expression_spectral
    n_sets             INTEGER,            -- per_set: the sets averaged; NULL for whole
    knn_jaccard_10     DOUBLE,             -- mean kNN Jaccard at k = 10
    knn_jaccard_30     DOUBLE,             -- mean kNN Jaccard at k = 30
    n_cells_jaccard    INTEGER,            -- cells the Jaccard is taken over (per layout)
    distance_spearman  DOUBLE,             -- Spearman of all pairwise distances
    trustworthiness    DOUBLE,             -- sklearn trustworthiness at k = 10
    n_cells_pairs      INTEGER,            -- cells Spearman and trustworthiness are taken over (per layout)
    n_cells            INTEGER,            -- cells in one scored layout (the dataset, or one set)
    set_size           INTEGER,
    overlap            DOUBLE,
    passes             INTEGER,
    estimate           VARCHAR,            -- generator / refined
    gene_coverage      DOUBLE,             -- share of the encoder's genes found in the dataset
    placement_device   VARCHAR             -- the device the placement ran on (cuda / cpu)
);

-- MIHD metrics database: one DuckDB file, one table per kind of result.
-- Every table starts with the same bookkeeping columns; the metrics store replaces all
-- rows of one (asset_key, partition_key) in a single transaction, so re-materializing an
-- asset partition replaces its rows instead of duplicating them.

CREATE TABLE IF NOT EXISTS slide_qc (
    asset_key                  VARCHAR NOT NULL,
    partition_key              VARCHAR NOT NULL,
    run_id                     VARCHAR NOT NULL,
    code_version               VARCHAR,
    written_at                 TIMESTAMP NOT NULL,
    slide_id                   VARCHAR NOT NULL,
    n_spots                    INTEGER,
    n_genes                    INTEGER,
    n_genes_detected           INTEGER,
    total_umi                  DOUBLE,
    median_umi_per_spot        DOUBLE,
    median_genes_per_spot      DOUBLE,
    n_positions                INTEGER,
    n_positions_in_tissue      INTEGER,
    frac_positions_in_tissue   DOUBLE,
    frac_spots_on_tissue_image DOUBLE,
    n_spots_labelled           INTEGER,
    counts_format              VARCHAR,
    positions_format           VARCHAR
);

CREATE TABLE IF NOT EXISTS slide_image_checks (
    asset_key       VARCHAR NOT NULL,
    partition_key   VARCHAR NOT NULL,
    run_id          VARCHAR NOT NULL,
    code_version    VARCHAR,
    written_at      TIMESTAMP NOT NULL,
    slide_id        VARCHAR NOT NULL,
    image           VARCHAR NOT NULL,   -- fullres / hires / lowres
    path            VARCHAR,
    scale           DOUBLE,             -- factor applied to full-resolution coordinates
    n_spots         INTEGER,
    frac_in_bounds  DOUBLE,
    frac_on_tissue  DOUBLE,
    threshold       DOUBLE,             -- Otsu threshold on HSV saturation
    passed          BOOLEAN,
    problem         VARCHAR,
    declared_scale  VARCHAR,            -- placement applied: <image>_scale, or given
    -- On-tissue fraction per placement tried (NULL: not tried, or no tissue contrast)
    frac_on_tissue_fullres_scale DOUBLE,
    frac_on_tissue_hires_scale   DOUBLE,
    frac_on_tissue_lowres_scale  DOUBLE,
    frac_on_tissue_coords_in_hires_px  DOUBLE, -- coordinates taken as hires-image pixels
    frac_on_tissue_coords_in_lowres_px DOUBLE, -- coordinates taken as lowres-image pixels
    frac_on_tissue_swapped_xy    DOUBLE, -- x and y swapped, at the declared scale
    best_fit        VARCHAR,            -- placement with the highest fraction; '' without tissue contrast
    frac_on_tissue_best_fit      DOUBLE
);
-- Databases created before the placement columns existed get them here.
ALTER TABLE slide_image_checks ADD COLUMN IF NOT EXISTS declared_scale VARCHAR;
ALTER TABLE slide_image_checks ADD COLUMN IF NOT EXISTS frac_on_tissue_fullres_scale DOUBLE;
ALTER TABLE slide_image_checks ADD COLUMN IF NOT EXISTS frac_on_tissue_hires_scale DOUBLE;
ALTER TABLE slide_image_checks ADD COLUMN IF NOT EXISTS frac_on_tissue_lowres_scale DOUBLE;
ALTER TABLE slide_image_checks ADD COLUMN IF NOT EXISTS frac_on_tissue_coords_in_hires_px DOUBLE;
ALTER TABLE slide_image_checks ADD COLUMN IF NOT EXISTS frac_on_tissue_coords_in_lowres_px DOUBLE;
ALTER TABLE slide_image_checks ADD COLUMN IF NOT EXISTS frac_on_tissue_swapped_xy DOUBLE;
ALTER TABLE slide_image_checks ADD COLUMN IF NOT EXISTS best_fit VARCHAR;
ALTER TABLE slide_image_checks ADD COLUMN IF NOT EXISTS frac_on_tissue_best_fit DOUBLE;

CREATE TABLE IF NOT EXISTS preprocessing_runs (
    asset_key       VARCHAR NOT NULL,
    partition_key   VARCHAR NOT NULL,
    run_id          VARCHAR NOT NULL,
    code_version    VARCHAR,
    written_at      TIMESTAMP NOT NULL,
    slide_id        VARCHAR NOT NULL,
    preset          VARCHAR NOT NULL,
    steps           VARCHAR NOT NULL,   -- ordered, ' -> ' separated
    override        BOOLEAN NOT NULL,
    notes           VARCHAR,
    n_spots         INTEGER,
    n_genes_out     INTEGER,
    seconds         DOUBLE
);

CREATE TABLE IF NOT EXISTS embedding_runs (
    asset_key          VARCHAR NOT NULL,
    partition_key      VARCHAR NOT NULL,
    run_id             VARCHAR NOT NULL,
    code_version       VARCHAR,
    written_at         TIMESTAMP NOT NULL,
    slide_id           VARCHAR NOT NULL,
    modality           VARCHAR NOT NULL,   -- gene / vision
    encoder            VARCHAR NOT NULL,
    variant            VARCHAR NOT NULL,   -- '' for gene encoders
    config             VARCHAR,            -- full / tiny (small network of the same code)
    profile            VARCHAR,            -- demo / full
    n_spots            INTEGER,
    dims               INTEGER,
    weights            VARCHAR,            -- random / file:<sha> / pretrained / none
    device             VARCHAR,
    seconds            DOUBLE,
    patches_per_second DOUBLE,
    n_padded           INTEGER,
    -- GPU steps (NULL for PCA): compute.device (auto / cuda / cpu), the device the step ran
    -- on (cuda / cpu), and what configured a GPU for it ('' when nothing did)
    device_requested   VARCHAR,
    device_used        VARCHAR,
    gpu_expected_by    VARCHAR
);
-- Databases written before the device columns existed (their rows read NULL).
ALTER TABLE embedding_runs ADD COLUMN IF NOT EXISTS device_requested VARCHAR;
ALTER TABLE embedding_runs ADD COLUMN IF NOT EXISTS device_used VARCHAR;
ALTER TABLE embedding_runs ADD COLUMN IF NOT EXISTS gpu_expected_by VARCHAR;

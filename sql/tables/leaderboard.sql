-- Leaderboard submissions (mihd_assets/leaderboard): every bundle the ingest read from the relay's
-- queue, accepted or rejected with the reason, and the platform's own scores of each accepted one.
-- Both tables are written whole by `reports/leaderboard_submissions` (partition ''), from the
-- queue as it stands, so re-running the ingest gives the same rows.

CREATE TABLE IF NOT EXISTS submissions (
    asset_key          VARCHAR NOT NULL,
    partition_key      VARCHAR NOT NULL,
    run_id             VARCHAR NOT NULL,
    code_version       VARCHAR,
    written_at         TIMESTAMP NOT NULL,
    submission_id      VARCHAR NOT NULL,   -- the relay's receipt id (= the queue file's name)
    queue_file         VARCHAR NOT NULL,
    received_at        TIMESTAMP,          -- when the relay received it (UTC); NULL when the envelope is unreadable
    client_hash        VARCHAR,            -- salted HMAC of the client address; never published
    content_hash       VARCHAR,            -- as the bundle states it; verified when status is accepted
    method_name        VARCHAR,            -- submitted text, stored as sent (cut to its schema length); shown escaped
    method_version     VARCHAR,
    description        VARCHAR,
    link               VARCHAR,
    platform_version   VARCHAR,            -- the submitter's platform version and commit
    platform_commit    VARCHAR,
    n_slides           INTEGER,
    slide_ids          VARCHAR,            -- comma-separated
    status             VARCHAR NOT NULL,   -- accepted | rejected
    reason             VARCHAR,            -- why it was rejected; NULL when accepted
    duplicate_of       VARCHAR             -- receipt id of the first submission of the same content
);

CREATE TABLE IF NOT EXISTS submission_scores (
    asset_key          VARCHAR NOT NULL,
    partition_key      VARCHAR NOT NULL,
    run_id             VARCHAR NOT NULL,
    code_version       VARCHAR,
    written_at         TIMESTAMP NOT NULL,
    submission_id      VARCHAR NOT NULL,
    slide_id           VARCHAR NOT NULL,
    n_spots            INTEGER,            -- spots of the platform's slide (every one has a label)
    n_labelled         INTEGER,            -- of those, spots with a truth label
    n_labels           INTEGER,            -- distinct submitted labels
    n_layers           INTEGER,            -- distinct truth labels
    -- Computed by the platform from the submitted labels and its own truth (as clustering_metrics)
    ari                DOUBLE,
    nmi                DOUBLE,
    homogeneity        DOUBLE,
    completeness       DOUBLE,
    chaos              DOUBLE,
    pas                DOUBLE,
    -- What the submitter claimed: recorded, never shown or ranked
    claimed_ari        DOUBLE,
    claimed_nmi        DOUBLE
);

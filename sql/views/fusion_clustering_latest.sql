-- Each method's row as last written (one per slide x representation x method x refinement).
CREATE OR REPLACE VIEW clustering_latest AS
SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (
        PARTITION BY slide_id, representation, clustering_method, refinement ORDER BY written_at DESC) AS rn
    FROM clustering_metrics
) WHERE rn = 1;

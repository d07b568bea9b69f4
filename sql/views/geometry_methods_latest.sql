-- Every method next to the baselines, per held-out slide (the denoiser's per-sigma rows are
-- in geometry_scale_by_sigma).
CREATE OR REPLACE VIEW geometry_methods_latest AS
SELECT
    slide_id,
    method,
    round(knn_jaccard, 4)       AS knn_jaccard,
    round(trustworthiness, 4)   AS trustworthiness,
    round(distance_spearman, 4) AS distance_spearman,
    round(scale_ratio, 4)       AS scale_ratio,
    n_sets,
    k,
    checkpoint_id,
    step
FROM geometry_metrics
WHERE sigma_bin = ''
ORDER BY slide_id, knn_jaccard DESC;

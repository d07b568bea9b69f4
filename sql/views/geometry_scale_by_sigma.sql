-- Per-sigma scale table: one-step denoising of noised held-out targets, by noise bin,
-- pooled over held-out slides (weighted by sets). Scale ratio < 1 = the denoiser shrinks sets.
CREATE OR REPLACE VIEW geometry_scale_by_sigma AS
SELECT
    checkpoint_id,
    step,
    sigma_bin,
    min(sigma_lo)                                        AS sigma_lo,
    sum(n_evaluations)                                   AS n,
    sum(scale_ratio * n_evaluations) / sum(n_evaluations) AS scale_ratio,
    sum(knn_jaccard * n_evaluations) / sum(n_evaluations) AS knn_jaccard,
    sum(trustworthiness * n_evaluations) / sum(n_evaluations) AS trustworthiness,
    any_value(sigma_data)                                AS sigma_data
FROM geometry_metrics
WHERE method = 'denoiser'
GROUP BY checkpoint_id, step, sigma_bin
ORDER BY checkpoint_id, sigma_lo;

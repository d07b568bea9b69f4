-- Each placement method next to the better baseline on the same cells, per dataset and scope
-- (whole layout, or the mean over placement sets: the per-set rows show what joining costs).
CREATE OR REPLACE VIEW cell_placement_vs_baselines AS
WITH scored AS (
    SELECT
        *,
        max(CASE WHEN method IN ('random', 'expression_spectral') THEN knn_jaccard_10 END)
            OVER (PARTITION BY dataset_id, checkpoint_id, scope) AS best_baseline_jaccard_10,
        max(CASE WHEN method = 'expression_spectral' THEN knn_jaccard_10 END)
            OVER (PARTITION BY dataset_id, checkpoint_id, scope) AS spectral_jaccard_10,
        max(CASE WHEN method = 'random' THEN knn_jaccard_10 END)
            OVER (PARTITION BY dataset_id, checkpoint_id, scope) AS random_jaccard_10
    FROM cell_placement_metrics
)
SELECT
    dataset_id,
    scope,
    method,
    round(knn_jaccard_10, 4)                                    AS knn_jaccard_10,
    round(knn_jaccard_30, 4)                                    AS knn_jaccard_30,
    round(distance_spearman, 4)                                 AS distance_spearman,
    round(trustworthiness, 4)                                   AS trustworthiness,
    round(spectral_jaccard_10, 4)                               AS spectral_jaccard_10,
    round(random_jaccard_10, 4)                                 AS random_jaccard_10,
    round(knn_jaccard_10 / nullif(best_baseline_jaccard_10, 0), 2) AS jaccard_10_over_best_baseline,
    n_cells,
    n_cells_pairs,
    n_sets,
    set_size,
    gene_coverage,
    checkpoint_id,
    checkpoint_step
FROM scored
ORDER BY dataset_id, scope DESC, knn_jaccard_10 DESC;

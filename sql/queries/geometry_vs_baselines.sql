-- Does the model beat the baselines on every held-out slide? (kNN Jaccard@k)
SELECT
    slide_id,
    max(knn_jaccard) FILTER (WHERE method = 'generator')           AS generator,
    max(knn_jaccard) FILTER (WHERE method = 'refined')             AS refined,
    max(knn_jaccard) FILTER (WHERE method = 'full_sampler')        AS full_sampler,
    max(knn_jaccard) FILTER (WHERE method = 'expression_spectral') AS expression_spectral,
    max(knn_jaccard) FILTER (WHERE method = 'random')              AS random
FROM geometry_metrics
WHERE sigma_bin = ''
GROUP BY slide_id
ORDER BY slide_id;

-- Leaderboard views over clustering_latest (views load in name order: after fusion_clustering_latest).
CREATE OR REPLACE VIEW method_leaderboard AS
SELECT representation, kind, fusion_method, gene_encoder, vision, clustering_method, refinement,
       count(*)                 AS n_slides,
       avg(ari)                 AS mean_ari,
       median(ari)              AS median_ari,
       avg(nmi)                 AS mean_nmi,
       median(nmi)              AS median_nmi,
       avg(chaos)               AS mean_chaos,
       avg(pas)                 AS mean_pas,
       bool_or(clustering_method_used <> clustering_method) AS any_fallback,
       bool_or(weights = 'random') AS any_random_weights
FROM clustering_latest
WHERE metrics_status = 'ok'
GROUP BY ALL
ORDER BY mean_ari DESC;

CREATE OR REPLACE VIEW best_method_per_slide AS
SELECT slide_id, representation, clustering_method, refinement, ari, nmi, chaos, pas, weights
FROM (
    SELECT *, row_number() OVER (PARTITION BY slide_id ORDER BY ari DESC) AS rank_in_slide
    FROM clustering_latest WHERE metrics_status = 'ok'
) WHERE rank_in_slide = 1
ORDER BY slide_id;

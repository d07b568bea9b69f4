-- Leaderboard views over clustering_over_seeds (views load in name order: after fusion_clustering_latest).
-- A method's score on a slide is its mean over replicates; the leaderboard averages slides.
CREATE OR REPLACE VIEW method_leaderboard AS
SELECT representation, kind, fusion_method, gene_encoder, vision, clustering_method, refinement,
       count(*)                 AS n_slides,
       max(n_replicates)        AS n_replicates,
       avg(mean_ari)            AS mean_ari,
       median(mean_ari)         AS median_ari,
       avg(sd_ari)              AS mean_sd_ari_over_seeds,
       avg(mean_nmi)            AS mean_nmi,
       median(mean_nmi)         AS median_nmi,
       avg(sd_nmi)              AS mean_sd_nmi_over_seeds,
       avg(mean_chaos)          AS mean_chaos,
       avg(mean_pas)            AS mean_pas,
       bool_or(any_fallback)    AS any_fallback,
       bool_or(any_random_weights) AS any_random_weights,
       bool_or(any_n_clusters_mismatch) AS any_n_clusters_mismatch
FROM clustering_over_seeds
GROUP BY ALL
ORDER BY mean_ari DESC;

CREATE OR REPLACE VIEW best_method_per_slide AS
SELECT slide_id, representation, clustering_method, refinement, n_replicates,
       mean_ari AS ari, sd_ari, mean_nmi AS nmi, mean_chaos AS chaos, mean_pas AS pas, any_random_weights
FROM (
    SELECT *, row_number() OVER (PARTITION BY slide_id ORDER BY mean_ari DESC) AS rank_in_slide
    FROM clustering_over_seeds
) WHERE rank_in_slide = 1
ORDER BY slide_id;

-- Each method's row as last written (one per slide x representation x method x refinement x replicate).
CREATE OR REPLACE VIEW clustering_latest AS
SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (
        PARTITION BY slide_id, representation, clustering_method, refinement, coalesce(replicate, 0)
        ORDER BY written_at DESC) AS rn
    FROM clustering_metrics
) WHERE rn = 1;

-- Per slide and method: mean and spread over replicates (seeds).
CREATE OR REPLACE VIEW clustering_over_seeds AS
SELECT slide_id, representation, kind, fusion_method, gene_encoder, vision, clustering_method, refinement,
       count(*)              AS n_replicates,
       avg(ari)              AS mean_ari,
       stddev_samp(ari)      AS sd_ari,
       avg(nmi)              AS mean_nmi,
       stddev_samp(nmi)      AS sd_nmi,
       avg(chaos)            AS mean_chaos,
       avg(pas)              AS mean_pas,
       bool_or(clustering_method_used <> clustering_method) AS any_fallback,
       bool_or(weights = 'random') AS any_random_weights,
       bool_or(n_clusters_found <> n_clusters_requested) AS any_n_clusters_mismatch  -- NULL: rows predate the counts
FROM clustering_latest
WHERE metrics_status = 'ok'
GROUP BY ALL;

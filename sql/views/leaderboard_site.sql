-- The public leaderboard (reports/leaderboard_site; views load in name order, after
-- fusion_clustering_latest). One row per entry x slide: the platform's own methods (mean over
-- replicates, from clustering_over_seeds) and accepted submissions as the platform scored them
-- (submission_scores). Numbers a submitter claimed never appear here.
CREATE OR REPLACE VIEW leaderboard_scores AS
SELECT 'platform--' || representation || '--' || clustering_method || '--' || refinement AS entry_id,
       'platform'                AS source,
       representation || ' · ' || clustering_method
           || CASE WHEN refinement = 'none' THEN '' ELSE ' + ' || refinement END AS method_name,
       CAST(NULL AS VARCHAR)     AS method_version,
       CAST(NULL AS VARCHAR)     AS submission_id,
       slide_id,
       n_replicates,
       mean_ari                  AS ari,
       mean_nmi                  AS nmi,
       mean_chaos                AS chaos,
       mean_pas                  AS pas,
       any_random_weights        AS random_weights,
       any_fallback              AS fallback
FROM clustering_over_seeds
UNION ALL BY NAME
SELECT 'submission--' || sc.submission_id AS entry_id,
       'submission'              AS source,
       s.method_name,
       s.method_version,
       sc.submission_id,
       sc.slide_id,
       1                         AS n_replicates,
       sc.ari, sc.nmi, sc.chaos, sc.pas,
       false                     AS random_weights,
       false                     AS fallback
FROM submission_scores sc
JOIN submissions s ON s.submission_id = sc.submission_id
WHERE s.status = 'accepted';

-- One row per entry, ranked by mean ARI over the slides it was scored on.
CREATE OR REPLACE VIEW leaderboard_entries AS
WITH per_entry AS (
    SELECT entry_id, source, method_name, method_version, submission_id,
           count(*)                                  AS n_slides,
           string_agg(slide_id, ', ' ORDER BY slide_id) AS slides,
           avg(ari)                                  AS mean_ari,
           avg(nmi)                                  AS mean_nmi,
           avg(chaos)                                AS mean_chaos,
           avg(pas)                                  AS mean_pas,
           bool_or(random_weights)                   AS random_weights,
           bool_or(fallback)                         AS fallback
    FROM leaderboard_scores
    GROUP BY entry_id, source, method_name, method_version, submission_id
)
SELECT row_number() OVER (ORDER BY e.mean_ari DESC NULLS LAST, e.entry_id) AS rank,
       e.*,
       s.description, s.link, s.received_at, s.content_hash, s.platform_version, s.platform_commit
FROM per_entry e
LEFT JOIN submissions s ON s.submission_id = e.submission_id
ORDER BY rank;

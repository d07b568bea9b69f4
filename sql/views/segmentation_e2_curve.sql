-- E2: label-efficiency curve, test AP50 per training budget over seeds.
CREATE OR REPLACE VIEW segmentation_e2_curve AS
SELECT budget,
       count(*)            AS n_seeds,
       avg(ap50)           AS ap50_mean,
       stddev_samp(ap50)   AS ap50_sd,
       avg(f1)             AS f1_mean,
       min(config)         AS config,
       min(weights)        AS weights
FROM segmentation_metrics
WHERE experiment = 'E2' AND level = 'total'
GROUP BY budget
ORDER BY budget;

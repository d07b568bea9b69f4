-- E1: one row per model, test-set totals (AP50 = mean over images; P/R/F1 from summed counts).
CREATE OR REPLACE VIEW segmentation_e1_summary AS
SELECT model, weights, config, profile, ap50, "precision", recall, f1, tp, fp, fn, n_true, n_pred, written_at
FROM segmentation_metrics
WHERE experiment = 'E1' AND level = 'total'
ORDER BY CASE model WHEN 'baseline' THEN 0 WHEN 'generic' THEN 1 WHEN 'marker_specific' THEN 2 ELSE 3 END;

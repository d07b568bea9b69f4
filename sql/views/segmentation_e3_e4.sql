-- E3 gating x minimum area and E4 points-per-side sweep (method says 'proxy:...' when no micro-sam ran).
CREATE OR REPLACE VIEW segmentation_e3_gating AS
SELECT model, gating, min_area, ap50, "precision", recall, f1, tp, fp, fn
FROM segmentation_metrics
WHERE experiment = 'E3' AND level = 'total'
ORDER BY gating, min_area;

CREATE OR REPLACE VIEW segmentation_e4_sweep AS
SELECT model, method, points_per_side, ap50, "precision", recall, f1, tp, fp, fn
FROM segmentation_metrics
WHERE experiment = 'E4' AND level = 'total'
ORDER BY points_per_side;

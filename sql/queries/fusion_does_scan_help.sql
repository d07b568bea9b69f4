-- Does SCAN beat plain clustering of the same vision embedding (image-only)?
SELECT s.slide_id, s.vision, s.refinement,
       b.ari AS baseline_mclust_ari, s.ari AS scan_ari, s.ari - b.ari AS gain
FROM clustering_latest s
JOIN clustering_latest b
  ON b.slide_id = s.slide_id AND b.representation = 'vision_' || s.vision
 AND b.clustering_method = 'mclust' AND b.refinement = s.refinement
WHERE s.kind = 'image_only' AND s.fusion_method = 'scan'
ORDER BY s.slide_id, s.refinement;

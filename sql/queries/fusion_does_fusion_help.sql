-- Does adding the image help? Each fusion vs the gene-only embedding it fused,
-- same clustering method and refinement, per slide.
SELECT f.slide_id, f.fusion_method, f.clustering_method, f.refinement,
       g.ari AS gene_only_ari, f.ari AS fusion_ari, f.ari - g.ari AS gain
FROM clustering_latest f
JOIN clustering_latest g
  ON g.slide_id = f.slide_id AND g.representation = 'gene_' || f.gene_encoder
 AND g.clustering_method = f.clustering_method AND g.refinement = f.refinement
WHERE f.kind = 'fusion' AND f.gene_encoder <> 'hvg'
ORDER BY gain DESC;

-- What mclust (vs k-means, the usual silent fallback; about 0.15 ARI on DLPFC 151673) and refinement are worth.
SELECT representation, refinement,
       avg(ari) FILTER (WHERE clustering_method = 'mclust') AS mclust_ari,
       avg(ari) FILTER (WHERE clustering_method = 'kmeans') AS kmeans_ari,
       avg(ari) FILTER (WHERE clustering_method = 'leiden') AS leiden_ari
FROM clustering_latest
WHERE metrics_status = 'ok' AND kind <> 'image_only'
GROUP BY ALL
ORDER BY representation, refinement;

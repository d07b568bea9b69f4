-- One row per slide: the QC numbers and whether every image passed the tissue check.
CREATE OR REPLACE VIEW slide_qc_latest AS
SELECT
    q.slide_id,
    q.n_spots,
    q.n_genes,
    q.n_genes_detected,
    q.total_umi,
    q.median_umi_per_spot,
    q.median_genes_per_spot,
    q.frac_positions_in_tissue,
    q.frac_spots_on_tissue_image,
    q.n_spots_labelled,
    q.counts_format,
    q.positions_format,
    c.images_checked,
    c.images_failed,
    c.min_frac_on_tissue,
    q.written_at
FROM slide_qc AS q
LEFT JOIN (
    SELECT
        slide_id,
        count(*)                      AS images_checked,
        count(*) FILTER (WHERE NOT passed) AS images_failed,
        min(frac_on_tissue)           AS min_frac_on_tissue
    FROM slide_image_checks
    GROUP BY slide_id
) AS c USING (slide_id)
ORDER BY q.slide_id;

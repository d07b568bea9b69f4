-- Size and depth of every registered slide.
SELECT slide_id, n_spots, n_genes, median_umi_per_spot, frac_spots_on_tissue_image, images_failed
FROM slide_qc_latest;

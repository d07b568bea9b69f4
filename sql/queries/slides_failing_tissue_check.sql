-- Slides with an image whose spots do not land on tissue (e.g. a full-res image addressed with hires-scaled coordinates).
SELECT slide_id, image, scale, frac_in_bounds, frac_on_tissue, problem
FROM slide_image_checks
WHERE NOT passed
ORDER BY slide_id, image;

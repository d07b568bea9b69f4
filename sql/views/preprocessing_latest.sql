-- Which preset and which exact ordered steps produced each slide's preprocessed matrix.
CREATE OR REPLACE VIEW preprocessing_latest AS
SELECT slide_id, preset, steps, override, notes, n_spots, n_genes_out, seconds, written_at
FROM preprocessing_runs
ORDER BY slide_id, preset;

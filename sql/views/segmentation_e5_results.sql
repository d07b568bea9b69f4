-- E5: Spearman + FDR and bootstrap stability side by side, baseline vs fine-tuned.
CREATE OR REPLACE VIEW segmentation_e5_results AS
SELECT s.model, s.outcome, s.n_donors, s.n_dropped, s.rho, s.p_value, s.q_value,
       b.ci_low, b.ci_high, b.sign_consistency, b.n_replicates, s.note
FROM e5_spearman AS s
LEFT JOIN e5_bootstrap AS b USING (model, outcome)
ORDER BY s.model, s.outcome;

-- Outcomes whose donor marker-positive ratio is associated at FDR < 0.05, per model.
SELECT model, outcome, n_donors, round(rho, 3) AS rho, q_value, ci_low, ci_high, sign_consistency
FROM segmentation_e5_results
WHERE q_value < 0.05
ORDER BY model, q_value;

-- E1 test-set scores per model next to how each model was trained.
SELECT m.model, m.ap50, m."precision", m.recall, m.f1, r.weights, r.config, r.n_train_used, r.n_dropped_min_masks
FROM segmentation_e1_summary AS m
LEFT JOIN segmentation_models AS r ON r.experiment = 'E1' AND r.model = m.model
ORDER BY m.ap50 DESC;

"""Phase 2 of the report: leak-free feature sets with chronological splits, and an honest baseline.

``bqx.ml.features`` builds per-bar features from the stored BQX rows and the minute bars, a
target h bars ahead, and train/validation/test splits separated by an embargo (docs/ml.md).
``bqx.ml.baseline`` fits simple models on train, chooses on validation, reports once on test
beside a random and a mean baseline, with a block-bootstrap significance statement.
"""

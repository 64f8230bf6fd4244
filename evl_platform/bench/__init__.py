"""Speed measurements: data loading, training steps, inference and sweeps (`evl-platform bench`)."""

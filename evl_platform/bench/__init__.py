"""Speed measurements: data loading (and, later, training steps, inference, sweeps)."""

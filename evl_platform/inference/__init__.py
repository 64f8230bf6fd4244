"""After training: evaluate a trained run under any test views, predict videos, import the
official EVL checkpoints, and package a model as an MLflow (pyfunc) model."""

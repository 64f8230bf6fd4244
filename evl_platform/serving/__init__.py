"""A trained model as a video classifier, and that classifier as an MLflow (pyfunc) model.

Below ``train`` in the layers (it needs only config, data, models and tracking), so the
training launcher can package every trained model and ``inference`` can predict with it.
"""

"""The code of a run's MLflow model (MLflow's "models from code"): MLflow copies this file
into the model and runs it on loading; it names the model class, so nothing is pickled."""

from mlflow.models import set_model

from evl_platform.serving.pyfunc import EVLPyfuncModel

set_model(EVLPyfuncModel())

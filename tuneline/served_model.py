"""The code of every registered model (an MLflow model from code): MLflow runs this file
to load it. The model itself is tuneline/serving.py's `Answerer`."""

import mlflow

from tuneline.serving import Answerer

mlflow.models.set_model(Answerer())

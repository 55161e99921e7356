"""mlflow-guard: authentication, authorization and audit in front of an unmodified MLflow."""

__version__ = "0.1.0"

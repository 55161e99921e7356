"""The ``mlflow-guard`` command (split into one module per command group next)."""

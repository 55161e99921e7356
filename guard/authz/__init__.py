"""Authorization: who may do what to which MLflow resource (casbin policies, a fast index)."""

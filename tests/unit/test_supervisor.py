from pathlib import Path

from server.supervisor import EmbeddedConfig, child_environment, mlflow_command


def config(**overrides: object) -> EmbeddedConfig:
    values: dict[str, object] = {
        "data_dir": Path("/data"), "backend_store_uri": "", "default_artifact_root": "",
        "artifacts_destination": "", "serve_artifacts": True, "startup_timeout": 60.0,
        "restart_backoff_max": 30.0,
    }  # fmt: skip
    return EmbeddedConfig(**(values | overrides))  # type: ignore[arg-type]


def test_child_environment_is_scrubbed() -> None:
    env = child_environment(
        {
            "PATH": "/usr/bin",
            "AWS_ACCESS_KEY_ID": "kept-for-object-stores",
            "MLFLOW_GUARD_SECRET_KEY": "x" * 40,
            "MLFLOW_GUARD_BOOTSTRAP_TOKEN": "mlg_" + "y" * 43,
            "MLFLOW_SERVER_ALLOWED_HOSTS": "*",
            "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE": "true",
            "MLFLOW_TRACKING_URI": "http://elsewhere",
            "_MLFLOW_SERVER_FILE_STORE": "/srv/x",
            "mlflow_lowercase": "x",
        }
    )
    assert env == {
        "PATH": "/usr/bin",
        "AWS_ACCESS_KEY_ID": "kept-for-object-stores",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PYTHONUNBUFFERED": "1",
    }


def test_command_is_lean_and_loopback_only() -> None:
    command = mlflow_command(config(), 5123)
    joined = " ".join(command)
    assert "--host 127.0.0.1 --port 5123 --workers 1" in joined
    assert "--allowed-hosts 127.0.0.1:5123" in joined
    assert "--backend-store-uri sqlite:////data/mlflow/mlflow.db" in joined
    assert "--serve-artifacts --artifacts-destination /data/mlflow/artifacts" in joined
    assert "--default-artifact-root" not in joined


def test_command_honours_store_settings() -> None:
    command = mlflow_command(
        config(backend_store_uri="postgresql://db/mlflow", default_artifact_root="s3://b/a",
               serve_artifacts=False),
        5123,
    )  # fmt: skip
    joined = " ".join(command)
    assert "--backend-store-uri postgresql://db/mlflow" in joined
    assert "--no-serve-artifacts" in joined
    assert "--default-artifact-root s3://b/a" in joined

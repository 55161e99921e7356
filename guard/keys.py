"""The gateway's secret key: HMACs token digests. Never stored in the database.

``MLFLOW_GUARD_SECRET_KEY`` wins; otherwise the key file (``storage.secret_key_file``), created
with mode 0600 on first use. Every replica must use the same key, or tokens created on one are
unknown to the others.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

MIN_KEY_LENGTH = 32


class SecretKeyError(Exception):
    """The key is missing, unreadable or too short; the message says how to fix it."""


def load_secret_key(path: Path, environ: Mapping[str, str], create: bool = True) -> bytes:
    """Return the secret key, creating the key file if allowed and absent."""
    if value := environ.get("MLFLOW_GUARD_SECRET_KEY"):
        if len(value) < MIN_KEY_LENGTH:
            raise SecretKeyError(
                f"MLFLOW_GUARD_SECRET_KEY: shorter than {MIN_KEY_LENGTH} characters "
                "(generate one with: python -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return value.encode()
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        if not create:
            raise SecretKeyError(
                f"storage.secret_key_file: {path} does not exist (start the gateway once, or "
                "copy the key from another replica)"
            ) from None
        return _create(path)
    except OSError as exc:
        raise SecretKeyError(f"storage.secret_key_file: cannot read {path}: {exc}") from None
    if len(text) < MIN_KEY_LENGTH:
        raise SecretKeyError(
            f"storage.secret_key_file: {path} holds fewer than {MIN_KEY_LENGTH} characters "
            "(delete it to have a new key made, which invalidates every token)"
        )
    return text.encode()


def _create(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
        file.flush()
        os.fsync(file.fileno())
    try:
        os.link(draft, path)  # atomic and never overwrites: a complete key file or none
    except FileExistsError:
        return load_secret_key(path, {}, create=False)  # another process won; use theirs
    finally:
        draft.unlink()
    return key.encode()

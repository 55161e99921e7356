import datetime as dt
from collections.abc import Iterator
from importlib import resources

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

from guard.store.db import VERSION_TABLE, UTCDateTime, build_engine, migrate, ping


def head_revision() -> str:
    config = Config()
    config.set_main_option(
        "script_location", str(resources.files("guard.store").joinpath("migrations"))
    )
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


@pytest.fixture
def engine(database_uri: str) -> Iterator[sa.Engine]:
    engine = build_engine(database_uri)
    yield engine
    engine.dispose()


def test_migrations_use_their_own_version_table_beside_mlflows(engine: sa.Engine) -> None:
    # MLflow keeps its schema version in alembic_version; sharing a database must not touch it.
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('mlflow-head')"))
    migrate(engine)
    migrate(engine)
    tables = set(sa.inspect(engine).get_table_names())
    assert {VERSION_TABLE, "guard_tokens", "alembic_version"} <= tables
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == (
            "mlflow-head"
        )
        version = sa.table(VERSION_TABLE, sa.column("version_num"))
        assert conn.execute(sa.select(version.c.version_num)).scalar() == head_revision()
    ping(engine)


def test_utc_datetimes_round_trip_as_aware_utc(engine: sa.Engine) -> None:
    table = sa.Table("t", sa.MetaData(), sa.Column("at", UTCDateTime))
    table.create(engine)
    local = dt.datetime(2026, 3, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with engine.begin() as conn:
        conn.execute(table.insert().values(at=local))
        stored = conn.execute(sa.select(table.c.at)).scalar_one()
    assert stored == local
    assert stored.tzinfo == dt.UTC
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), engine.begin() as conn:
        conn.execute(table.insert().values(at=dt.datetime(2026, 1, 1)))


def test_sqlite_parent_directory_is_created(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = build_engine(f"sqlite:///{tmp_path / 'a' / 'b' / 'guard.db'}")
    migrate(engine)
    engine.dispose()
    assert (tmp_path / "a" / "b" / "guard.db").exists()

"""Shared fixtures: the repository root, a helper that runs commands from the project's environment, fresh PostgreSQL
databases."""
import contextlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def run(cmd, env=None, timeout=300, cwd=ROOT, check=False):
    """Run a command (list) with the project's environment first on PATH; return the CompletedProcess."""
    e = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    p = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


PG = dict(host=os.environ.get("HEDGERL_TEST_PG_HOST", "127.0.0.1"), port=int(os.environ.get("HEDGERL_TEST_PG_PORT",
        "5432")),
          user=os.environ.get("HEDGERL_TEST_PG_USER", "postgres"))


@contextlib.contextmanager
def fresh_pg_database(prefix: str, why: str):
    """A fresh PostgreSQL database `<prefix>_<random>` (SQLAlchemy URL), dropped at the end.
    Unreachable: fails under CI=true (saying `why` PostgreSQL is needed), else skips."""
    psycopg = pytest.importorskip("psycopg")
    try: admin = psycopg.connect(dbname="postgres", autocommit=True, connect_timeout=5, **PG)
    except psycopg.OperationalError as e:
        msg = f"PostgreSQL at {PG['host']}:{PG['port']} (user {PG['user']}) is unreachable: {e}".strip()
        if os.environ.get("CI") == "true": pytest.fail(f"{msg}\nCI=true: {why}", pytrace=False)
        pytest.skip(msg)
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try: yield f"postgresql+psycopg://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def empty_database(request, tmp_path) -> str:
    """For a fixture parametrised by sqlite/postgresql: a SQLite file, or the `pg_database` fixture's database with its
    schema wiped."""
    if request.param == "sqlite": return f"sqlite:///{tmp_path}/registry.sqlite"
    import sqlalchemy as sa
    u = request.getfixturevalue("pg_database")
    eng = sa.create_engine(u, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn: conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    eng.dispose()
    return u

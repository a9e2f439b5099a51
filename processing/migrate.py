"""Apply the database schema with Alembic (`meterflow db migrate`)."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from meterflow.settings import Settings
from processing.privileges import grant_service_privileges

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(settings: Settings) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would eat a '%' in the password.
    cfg.set_main_option("sqlalchemy.url", settings.db.sqlalchemy_url().replace("%", "%%"))
    return cfg


@retry(
    retry=retry_if_exception_type(OSError),
    stop=stop_after_delay(60),
    wait=wait_exponential(max=5),
    reraise=True,
)
def _wait_for_database(settings: Settings) -> None:
    import psycopg

    try:
        with psycopg.connect(settings.db.conninfo(), connect_timeout=3):
            return
    except psycopg.OperationalError as exc:
        raise OSError(str(exc)) from exc


def migrate(settings: Settings, revision: str = "heads") -> None:
    # "heads": schema branches (API and VPP tables grow independently of each other) all apply.
    _wait_for_database(settings)
    command.upgrade(alembic_config(settings), revision)
    grant_service_privileges(settings)
    log.info("database schema at %s", revision)


def current(settings: Settings) -> str:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, pool

    engine = create_engine(settings.db.sqlalchemy_url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        return ",".join(sorted(MigrationContext.configure(conn).get_current_heads())) or "none"

"""Alembic environment: runs on the connection Store hands over (config.attributes["connection"]), or on
sqlalchemy.url / $MINICHAT_STORE_URL when run from the alembic command line to write a new revision."""
from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from minichat.serve.store import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things in place; batch mode copies the table instead
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("MINICHAT_STORE_URL")
    if not url:
        from minichat.serve.store import default_url

        url = default_url()
    with create_engine(url).begin() as conn:
        _run(conn)

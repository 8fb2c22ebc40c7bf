"""Alembic environment of the labeling app's tables: run on the connection handed over by
minichat.label.service.ensure_schema (config.attributes["connection"]). Its own version table keeps these
revisions apart from the serving store's, so a tool that knows only the store's migrations still opens it."""
from __future__ import annotations

from alembic import context

from minichat.label.models import LabelBase

VERSION_TABLE = "label_alembic_version"
config = context.config


def _ours(obj, name, type_, reflected, compare_to) -> bool:
    # autogenerate: the serving store's tables live in the same database but are not ours
    return type_ != "table" or (name or "").startswith("label_") and name != VERSION_TABLE


connection = config.attributes["connection"]
context.configure(connection=connection, target_metadata=LabelBase.metadata, version_table=VERSION_TABLE,
                  include_object=_ours, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()

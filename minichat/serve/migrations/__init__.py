"""Alembic migrations of the serving store (see minichat/serve/store.py)."""

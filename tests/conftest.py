import os
import subprocess

import pytest
import torch

# Tests are small; one thread avoids oversubscription when several processes share 2 cores.
torch.set_num_threads(int(os.environ.get("MINICHAT_TEST_THREADS", "1")))


@pytest.fixture
def tiny_corpus(tmp_path):
    """A small, deterministic text corpus written to a file."""
    from minichat.data.world import builtin_corpus

    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(builtin_corpus(seed=0, n_docs=300)))
    return p


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the session (tests/pg.py), or a skip where the machine has none;
    MINICHAT_REQUIRE_POSTGRES=1 (set by CI) turns the skip into a failure."""
    from tests.pg import PostgresServer, find_bin

    bindir = find_bin()
    reason = None
    if bindir is None:
        reason = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            reason = "psycopg is not installed (pip install 'psycopg[binary]')"
    server = None
    if reason is None:
        try:
            server = PostgresServer(bindir).start()
        except (OSError, KeyError, subprocess.SubprocessError) as e:  # no postgres account, initdb failed, ...
            reason = f"could not start PostgreSQL from {bindir}: {e} {getattr(e, 'stderr', '') or ''}".strip()
    if server is None:
        if os.environ.get("MINICHAT_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """The store's URL, once on an SQLite file and once on a fresh database of a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres").new_database()

import os

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

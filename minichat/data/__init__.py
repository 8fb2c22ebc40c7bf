"""Data: corpora in, packed token shards out, deterministic batches; chat/preference/prompt datasets."""

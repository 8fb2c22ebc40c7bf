"""Read text corpora: .txt, .txt.gz, .jsonl(.gz) with a `text` field, folders of them, the built-in corpus,
and (optionally, for users with network) a Hugging Face dataset named as hf:NAME[:CONFIG][@SPLIT]."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterator

from minichat.errors import MinichatError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".jsonl", ".jsonl.gz")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MinichatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise MinichatError(f"{path}:{lineno}: expected an object with a string field {field!r}")
            yield obj[field]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise MinichatError(f"folder {path} contains no text files ({', '.join(TEXT_SUFFIXES)})")
        return files
    return [path]


def iter_documents(source: str, text_field: str = "text", seed: int = 0) -> Iterator[str]:
    """Yield documents (strings) from a corpus source, in a fixed order."""
    if source == "builtin":
        from minichat.data.world import builtin_corpus

        yield from builtin_corpus(seed=seed)
        return
    if source.startswith("hf:"):
        yield from _iter_hf(source[3:], text_field)
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise MinichatError(f"corpus {path} does not exist")
    for f in _files(path):
        if f.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _read_jsonl(f, text_field)
        else:
            with _open_text(f) as fh:
                yield fh.read()


def _iter_hf(spec: str, text_field: str) -> Iterator[str]:
    try:
        import datasets  # optional: only for users with network access
    except ImportError:
        raise MinichatError("reading hf:NAME needs the `datasets` package (pip install datasets)") from None
    split = "train"
    if "@" in spec:
        spec, split = spec.split("@", 1)
    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    for row in ds:
        yield row[text_field]


def read_corpus(source: str, text_field: str = "text", seed: int = 0) -> str:
    """The whole corpus as one string (documents joined by blank lines); errors if empty."""
    docs = [d for d in iter_documents(source, text_field, seed) if d]
    text = "\n\n".join(docs)
    if not text.strip():
        raise MinichatError(f"corpus {source} is empty")
    return text

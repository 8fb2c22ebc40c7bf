"""The learned scorer: hashed character and word n-grams -> one logistic-regression head per category.

Features come from scikit-learn's HashingVectorizer, so the artefact holds only numbers (hashed feature
indices and weights), never a vocabulary of the training text. Weights are pruned to the largest ones and
stored as float16 in a compressed .npz (no pickle), trained by `python -m minichat.moderation.train`.
"""
from __future__ import annotations

import html
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import regex

from minichat.errors import MinichatError
from minichat.moderation.normalize import normalize

ARTEFACT = "model/scorer.npz"
N_FEATURES = 2**19  # per vectoriser; char and word features use separate halves of the index space

_MENTION = regex.compile(r"@\w{1,30}")
_URL = regex.compile(r"https?://\S{1,300}|www\.\S{1,300}")
_RT = regex.compile(r"(?<!\w)rt(?!\w)")


def prepare(text: str, normalized=None) -> str:
    """The scorer's view of a text: HTML entities decoded, mentions/links/retweet marks made generic, normalised.

    Mentions and links are replaced because in social-media training data they correlate with labels by
    accident (who was retweeted), which would not carry over to chat text. `normalized`: normalize(text), when
    the caller has it; used where those replacements would change nothing (no '&', '@', link or overlong text).
    """
    if normalized is not None and len(text) <= 20000 and not any(c in text for c in ("&", "@", "http", "www.")):
        return _RT.sub(" ", normalized.text)
    text = html.unescape(text[:20000])  # the learned view of very long texts is their beginning
    text = _URL.sub(" link ", text)
    text = _MENTION.sub(" ", text)
    text = normalize(text).text
    return _RT.sub(" ", text)


def vectorizers():
    from sklearn.feature_extraction.text import HashingVectorizer

    common = dict(n_features=N_FEATURES, alternate_sign=False, lowercase=False, norm="l2", dtype=np.float32)
    char = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 5), **common)
    word = HashingVectorizer(analyzer="word", ngram_range=(1, 2), token_pattern=r"(?u)\b\w[\w']*\b", **common)
    return char, word


def featurize(texts: list[str]):
    import scipy.sparse as sp

    prepared = [prepare(t) for t in texts]
    char, word = vectorizers()
    return sp.hstack([char.transform(prepared), word.transform(prepared)], format="csr")


class LearnedScorer:
    """Per-category probabilities from the trained artefact."""

    def __init__(self, categories: list[str], weights, bias: np.ndarray, meta: dict):
        self.categories = categories
        self.weights = weights  # scipy CSR, (2 * N_FEATURES, n_categories)
        self.bias = bias
        self.meta = meta
        # score()'s fast path: the weight rows that are not all zero as one dense block, and each hashed
        # feature's row in it (-1: a zero row). The pruned artefact has ~79k such rows of 2^20 (4 MB).
        w = weights.tocsr()
        nz = np.flatnonzero(np.diff(w.indptr))
        self._row = np.full(w.shape[0], -1, dtype=np.int32)
        self._row[nz] = np.arange(len(nz), dtype=np.int32)
        if len(nz) >= _ROW_MASK:  # _code() keeps a row in the low bits
            raise MinichatError(f"the learned scorer has {len(nz):,} weight rows; at most {_ROW_MASK - 1:,} fit")
        self._dense = np.asarray(w[nz].todense(), dtype=np.float32)
        self._analyzers = None

    @classmethod
    def load(cls, path: str | Path | None = None) -> "LearnedScorer":
        import scipy.sparse as sp

        if path is None:
            ref = resources.files("minichat.moderation") / ARTEFACT
            if not ref.is_file():
                raise MinichatError("the learned moderation scorer is missing from the package; train it with "
                                    "`python -m minichat.moderation.train` or set settings.learned: false")
            with resources.as_file(ref) as p:
                return cls.load(p)
        p = Path(path)
        if not p.is_file():
            raise MinichatError(f"learned scorer {p} does not exist")
        try:
            z = np.load(p, allow_pickle=False)
            meta = json.loads(bytes(z["meta"]).decode("utf-8"))
            cats = list(meta["categories"])
            rows, cols, vals = z["rows"], z["cols"], z["vals"].astype(np.float32)
            bias = z["bias"].astype(np.float32)
        except (OSError, ValueError, KeyError) as e:
            raise MinichatError(f"learned scorer {p} is not a valid artefact: {e}") from None
        if meta.get("n_features") != N_FEATURES:
            raise MinichatError(f"learned scorer {p} was built for {meta.get('n_features')} hashed features, "
                                f"this code uses {N_FEATURES}; retrain it")
        w = sp.csr_matrix((vals, (rows, cols)), shape=(2 * N_FEATURES, len(cats)))
        return cls(cats, w, bias, meta)

    def score(self, texts: list[str], normalized: list | None = None) -> list[dict[str, float]]:
        """Per-category probabilities; `normalized` (optional): normalize(t) of each text, already computed."""
        if not texts:
            return []
        return [dict(zip(self.categories, map(float, row))) for row in self.probabilities(texts, normalized)]

    def probabilities(self, texts: list[str], normalized: list | None = None) -> np.ndarray:
        """score() as one (texts, categories) array, in the order of self.categories."""
        z = np.stack([self._logits(prepare(t, None if normalized is None else normalized[i]))
                      for i, t in enumerate(texts)])
        return 1.0 / (1.0 + np.exp(-z))

    def _code(self, idx: np.ndarray, k: int) -> np.ndarray:
        """Vectoriser k's feature indices as codes: index << _ROW_BITS | (their dense row + 1)."""
        return (idx << _ROW_BITS) | (self._row[idx + k * N_FEATURES].astype(np.int64) + 1)

    def _logits(self, prepared: str) -> np.ndarray:
        """featurize([text]) @ weights + bias, for one text without sklearn's per-call overhead (sparse matrices,
        validation: ~0.8 ms of a 1 ms score): the same analyzers and the same hash, index = |murmur3(gram)| mod
        N_FEATURES, counts L2-normalised per vectoriser, as HashingVectorizer(alternate_sign=False) computes."""
        if self._analyzers is None:
            self._analyzers = [v.build_analyzer() for v in vectorizers()]
            # char_wb n-grams never cross whitespace (sklearn pads and slices each word of text.split()), so a
            # text's char features are its words' features: cached per word (a stream guard re-reads the same
            # words every check); word n-grams, few, are cached per n-gram
            self._word_cache: dict[str, np.ndarray] = {}
            self._gram_cache: dict[str, int] = {}
        z = self.bias.astype(np.float64).copy()
        for k, analyze in enumerate(self._analyzers):
            # features as codes, index << 20 | (dense row + 1), cached with the words and n-grams: sorting codes
            # groups and orders them as the indices would, and the 4 MB index -> row table is not read per text
            # (in the server's moderation process every screen runs with cold caches: ~40% slower than warm)
            if k == 0:
                cache, parts = self._word_cache, []
                for w in prepared.split():
                    a = cache.get(w)
                    if a is None:
                        if len(cache) >= 100_000:  # bounded
                            cache.clear()
                        a = cache[w] = self._code(_hashed(analyze(w), {}), 0)
                    parts.append(a)
                if not parts:
                    continue
                codes = np.concatenate(parts)
            else:
                grams = word_grams(prepared)  # = analyze(prepared), without sklearn's per-call layers
                if not grams:
                    continue
                if len(self._gram_cache) >= 200_000:
                    self._gram_cache.clear()
                codes = _hashed(grams, self._gram_cache, lambda idx: self._code(idx, 1))
            if not len(codes):
                continue
            codes, counts = np.unique(codes, return_counts=True)
            vals = counts / np.sqrt(np.dot(counts, counts))
            rows = (codes & _ROW_MASK) - 1
            keep = rows >= 0
            z += vals[keep] @ self._dense[rows[keep]].astype(np.float64)
        return z


_ROW_BITS = 20  # a feature code's low bits: its row in the dense weight block + 1 (0: no weights)
_ROW_MASK = (1 << _ROW_BITS) - 1
_WORD_TOKEN = re.compile(r"(?u)\b\w[\w']*\b")  # vectorizers()'s token_pattern (sklearn compiles it with re)


def word_grams(text: str) -> list[str]:
    """The word vectoriser's analyzer on a prepared text: its tokens, then each adjacent pair joined by a space
    (HashingVectorizer(analyzer="word", ngram_range=(1, 2), lowercase=False) builds the same list; tested)."""
    toks = _WORD_TOKEN.findall(text)
    return toks + [a + " " + b for a, b in zip(toks, toks[1:])]


def _hashed(grams: list[str], cache: dict[str, int], code=None) -> np.ndarray:
    """HashingVectorizer's feature index of each n-gram: |murmur3(gram, seed 0)| mod N_FEATURES (-2^31 maps as
    sklearn maps it), or code(those indices) (non-negative), memoised in `cache`."""
    from sklearn.utils import murmurhash3_32

    get = cache.get
    out = np.fromiter((get(g, -1) for g in grams), dtype=np.int64, count=len(grams))
    miss = np.flatnonzero(out < 0)
    if len(miss):
        idx = np.empty(len(miss), dtype=np.int64)
        for j, i in enumerate(miss.tolist()):
            h = murmurhash3_32(grams[i], 0)
            idx[j] = (2**31 - 1 - (N_FEATURES - 1)) % N_FEATURES if h == -2**31 else abs(h) % N_FEATURES
        new = idx if code is None else code(idx)
        out[miss] = new
        for i, v in zip(miss.tolist(), new.tolist()):
            cache[grams[i]] = v
    return out

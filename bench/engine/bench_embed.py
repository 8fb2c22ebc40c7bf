"""Embeddings of the built-in model (`Engine.embeddings`, behind POST /v1/embeddings): quality and speed.

    python bench/engine/bench_embed.py [--threads 2]

Quality: embed_triplets.tsv (written for this bench) holds an anchor, a paraphrase of it and a sentence on another
subject; a triplet is right when the anchor's cosine similarity to its paraphrase is above that to the other
sentence, and also against every other triplet's paraphrase (retrieval: the paraphrase ranks first among all
paraphrases), against TF-IDF vectors of words. Both poolings, mean and last token, in fp32 and under bf16
autocast. Speed: texts per second for the triplets' sentences one at a time and 16 at a time.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    from minichat.engine import Engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [l.rstrip("\n").split("\t") for l in open(Path(__file__).with_name("embed_triplets.tsv"), encoding="utf-8")
            if l.strip() and not l.startswith("#")]
    eng = Engine.from_pretrained(a.model)
    tok = eng.tokenizer
    print(f"{a.model}, {a.threads} threads, {len(rows)} triplets")
    print("| pooling, autocast | paraphrase above the other sentence | paraphrase first among all paraphrases "
          "| texts/s one at a time | texts/s 16 at a time |")
    print("|---|---|---|---|---|")
    texts = [t for r in rows for t in r]
    ids = [tok.encode(t) for t in texts]
    # a lexical baseline: TF-IDF vectors of words, fitted on the triplets' own sentences
    from sklearn.feature_extraction.text import TfidfVectorizer

    tf = torch.tensor(TfidfVectorizer().fit_transform(texts).toarray(), dtype=torch.float32).reshape(len(rows), 3, -1)
    tf = torch.nn.functional.normalize(tf, dim=-1)
    tf_triplet = ((tf[:, 0] * tf[:, 1]).sum(-1) > (tf[:, 0] * tf[:, 2]).sum(-1)).float().mean()
    tf_retrieval = ((tf[:, 0] @ tf[:, 1].T).argmax(1) == torch.arange(len(rows))).float().mean()
    print(f"| TF-IDF of words (baseline) | {tf_triplet:.1%} | {tf_retrieval:.1%} | | |")
    for pooling, dtype in (("mean", torch.float32), ("mean", torch.bfloat16), ("last", torch.float32),
                           ("last", torch.bfloat16)):
        e = eng.embeddings(ids, pooling=pooling, dtype=dtype).reshape(len(rows), 3, -1)
        anchor, para, other = e[:, 0], e[:, 1], e[:, 2]
        pos = (anchor * para).sum(-1)
        triplet = (pos > (anchor * other).sum(-1)).float().mean().item()
        retrieval = ((anchor @ para.T).argmax(1) == torch.arange(len(rows))).float().mean().item()
        one, many = [], []
        for _ in range(3):
            t = time.perf_counter()
            for x in ids[:32]:
                eng.embeddings([x], pooling=pooling, dtype=dtype)
            one.append(32 / (time.perf_counter() - t))
            t = time.perf_counter()
            eng.embeddings(ids, pooling=pooling, dtype=dtype)
            many.append(len(ids) / (time.perf_counter() - t))
        print(f"| {pooling}, {str(dtype).removeprefix('torch.')} | {triplet:.1%} | {retrieval:.1%} | "
              f"{statistics.median(one):.0f} | {statistics.median(many):.0f} |")


if __name__ == "__main__":
    main()

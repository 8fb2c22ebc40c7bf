"""Tiny models for the engine and chat tests (helpers): a BPE tokenizer trained on a few lines and a small random
Transformer (grouped-query attention, untied head), saved as a real minichat checkpoint."""
import torch

from minichat.model import ModelConfig, Transformer
from minichat.tokenizer import BPETokenizer

LINES = [
    "Hello there! How are you today?",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 split into digits.",
    "Unicode: héllo wörld, 日本語, emoji 🙂 and more.",
    "A cat sat on the mat; the dog sat on the log.",
] * 20


def make_tiny(max_seq_len=128, seed=0, tie=False, n_kv_head=2):
    torch.manual_seed(seed)
    tok = BPETokenizer.train(LINES, vocab_size=300, min_frequency=1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=64,
                      max_seq_len=max_seq_len, tie_embeddings=tie, init_std=0.2)
    model = Transformer(cfg).eval()
    return model, tok

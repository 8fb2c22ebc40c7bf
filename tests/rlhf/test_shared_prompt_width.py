"""Shared-prompt reward batches are (longest prompt + longest answer) wide; only each row must fit the context."""
import pytest
import torch


def _rm(max_seq_len=16):
    from minichat.heads import ScalarModel
    from minichat.model import ModelConfig

    torch.manual_seed(0)
    return ScalarModel(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=max_seq_len))


def _rows():
    from minichat.data.chat import EncodedComparison

    # row 0: long prompt + short answers (14 tokens); row 1: short prompt + long answers (14): each fits 16,
    # but the shared layout is 12 + 12 = 24 wide
    return [EncodedComparison(list(range(1, 13)), [[20, 21], [22]], [0, 1]),
            EncodedComparison([3, 4], [list(range(30, 42)), list(range(30, 40))], [1, 0])]


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_batch_wider_than_context_scores_like_full_rows(attention):
    from minichat.data.chat import collate_rankings

    rm = _rm()
    rm.set_attention(attention)
    a, b = collate_rankings(_rows(), 0, True), collate_rankings(_rows(), 0, False)
    assert a["ids"].shape[1] + a["answers"].shape[1] > rm.cfg.max_seq_len >= b["ids"].shape[1]
    ra = rm(a["ids"], key_mask=a["key_mask"], answers=a["answers"], answer_lens=a["answer_lens"], owner=a["owner"])
    with torch.no_grad():
        rb = rm(b["ids"], key_mask=b["key_mask"])
    torch.testing.assert_close(ra.detach(), rb, atol=1e-5, rtol=1e-5)
    ra.sum().backward()  # the training path: gradients flow through the shared prompt's keys and values
    assert rm.head.weight.grad is not None and rm.layers[0].attn.wk.weight.grad.abs().sum() > 0


def test_a_row_longer_than_the_context_still_fails_clearly():
    from minichat.data.chat import EncodedComparison, collate_rankings

    rm = _rm()
    rows = [EncodedComparison(list(range(1, 13)), [[20, 21, 22, 23, 24], [22]], [0, 1])]  # 17 > 16
    a = collate_rankings(rows, 0, True)
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        rm(a["ids"], key_mask=a["key_mask"], answers=a["answers"], answer_lens=a["answer_lens"], owner=a["owner"])

"""Each loss against numbers worked out by hand (in the comments)."""
import math

import pytest
import torch

from minichat import losses as L


def test_masked_lm_loss_counts_only_masked_tokens():
    # V = 2; position 0: logits (0, ln 3) -> p(1) = 3/4; position 1: uniform -> p = 1/2
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    y = torch.tensor([[1, 0]])
    assert L.masked_lm_loss(logits, y, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(-math.log(0.75))
    assert L.masked_lm_loss(logits, y, torch.tensor([[1.0, 1.0]])).item() == pytest.approx((-math.log(0.75) + math.log(2)) / 2)
    assert L.masked_lm_loss(logits, y, torch.tensor([[1.0, 1.0]]), "sum").item() == pytest.approx(-math.log(0.75) + math.log(2))


def test_selected_lm_loss_is_the_masked_loss_from_fewer_logits():
    # the same two positions as above; the head ran only at position 0 (mask 1, 0): logits (1, V)
    y = torch.tensor([[1, 0]])
    sel = torch.tensor([[1.0, 0.0]])
    assert L.selected_lm_loss(torch.tensor([[0.0, math.log(3.0)]]), y, sel).item() == pytest.approx(-math.log(0.75))
    logits = torch.randn(3, 5, 7)
    y, mask = torch.randint(0, 7, (3, 5)), (torch.rand(3, 5) > 0.5).float()
    for red in ("mean", "sum"):
        torch.testing.assert_close(L.selected_lm_loss(logits[mask.bool()], y, mask, red),
                                   L.masked_lm_loss(logits, y, mask, red))


def test_sequence_logprobs_runs_the_head_at_answers_only():
    from minichat.model import ModelConfig, Transformer
    from minichat.train.common import sequence_logprobs

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, max_seq_len=16))
    x, y = torch.randint(0, 30, (3, 8)), torch.randint(0, 30, (3, 8))
    mask = torch.zeros(3, 8)
    mask[0, 5:], mask[1, 2:4] = 1, 1  # row 2: nothing counts
    full = (L.token_logprobs(model(x), y) * mask).sum(1)
    torch.testing.assert_close(sequence_logprobs(model, x, y, mask), full)
    assert sequence_logprobs(model, x, y, mask)[2].item() == 0.0


def test_ranking_pairs_with_ties():
    # ranks 0 < 1 = 1 < 2: every pair but the tie (1, 2): C(4,2) - 1 = 5
    assert sorted(L.ranking_pairs([0, 1, 1, 2])) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert L.ranking_pairs([2, 0]) == [(1, 0)]  # order of the list does not matter, ranks do
    assert len(L.ranking_pairs(list(range(9)))) == 36  # K = 9: C(9, 2)


def test_ranking_loss_is_mean_over_prompts_of_mean_over_pairs():
    # prompt 0: one pair, r_w - r_l = 2 -> log(1 + e^-2)
    # prompt 1: K = 3, rewards (1, 1, 0) ranked 0 < 1 < 2: differences 0, 1, 1 -> (log 2 + 2 log(1 + e^-1)) / 3
    r = torch.tensor([2.0, 0.0, 1.0, 1.0, 0.0])
    w, l, g = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 3, 4, 4]), torch.tensor([0, 1, 1, 1])
    p0 = math.log(1 + math.exp(-2))
    p1 = (math.log(2) + 2 * math.log(1 + math.exp(-1))) / 3
    assert L.ranking_loss(r[w], r[l], g).item() == pytest.approx((p0 + p1) / 2, rel=1e-6)
    # without groups every pair weighs the same
    assert L.ranking_loss(r[w], r[l]).item() == pytest.approx((p0 + 3 * p1) / 4, rel=1e-6)


def test_hinge_loss():
    # margin 1: a lead of 0.25 costs 0.75; a lead of 2 costs nothing; a deficit of 1 costs 2
    d = L.hinge_loss(torch.tensor([0.25, 2.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]), margin=1.0)
    assert d.tolist() == pytest.approx([0.75, 0.0, 2.0])
    assert L.ranking_loss(torch.tensor([0.25]), torch.tensor([0.0]), kind="hinge", margin=0.5).item() == pytest.approx(0.25)
    with pytest.raises(ValueError):
        L.ranking_loss(torch.tensor([0.0]), torch.tensor([0.0]), kind="square")


def test_kl_estimators():
    # π = 1/2, π_ref = 1/4: k1 = ln 2; k2 = ½ ln² 2; k3 with ρ = π_ref/π = ½: ½ − 1 − ln ½ = ln 2 − ½
    lp, lr = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert L.kl_k1(lp, lr).item() == pytest.approx(math.log(2))
    assert L.kl_k2(lp, lr).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert L.kl_k3(lp, lr).item() == pytest.approx(math.log(2) - 0.5)
    assert L.kl_k3(lr, lr).item() == 0.0


def test_gae_by_hand():
    # γ = 1, λ = ½; rewards (0, 1), values (0.5, 0.2); after the last token the value is 0
    # δ1 = 1 + 0 − 0.2 = 0.8 -> A1 = 0.8;  δ0 = 0 + 0.2 − 0.5 = −0.3 -> A0 = −0.3 + ½·0.8 = 0.1
    # a third, masked position (reward 5) must change nothing
    adv, ret = L.gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.2, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]),
                     gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.1, 0.8, 0.0])
    assert ret[0].tolist() == pytest.approx([0.6, 1.0, 0.0])
    # γ = 0.5, λ = 1: A1 = 0.8, δ0 = 0 + 0.5·0.2 − 0.5 = −0.4, A0 = −0.4 + 0.5·0.8 = 0
    adv, _ = L.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), gamma=0.5, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.0, 0.8])


def test_whiten():
    # (1, 2, 3): mean 2, variance 2/3 -> ±√(3/2); the masked 100 is ignored and zeroed
    w = L.whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert w.tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0], rel=1e-5)


def test_whiten_across_processes_uses_the_whole_batch():
    """Two 'processes' (threads meeting at a barrier, as all_reduce does) each whiten their half of a batch by
    the statistics of both halves: together they give what one process whitening the whole batch gives."""
    import threading

    torch.manual_seed(0)
    x, mask = torch.randn(6, 5) * 3 + 1, (torch.rand(6, 5) > 0.3).float()
    x[:3] += 10  # the halves differ, so per-half whitening would differ from the whole's
    whole = L.whiten(x, mask)
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def process(rank):
        def all_sum(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        rows = slice(3 * rank, 3 * rank + 3)
        out[rank] = L.whiten(x[rows], mask[rows], all_sum=all_sum)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    torch.testing.assert_close(torch.cat(out), whole)
    assert not torch.allclose(L.whiten(x[:3], mask[:3]), whole[:3], atol=1e-2)


def test_group_centered_leave_one_out_by_hand():
    # prompt A's answers score (1, 2, 6): 1 − (2+6)/2 = −3, 2 − (1+6)/2 = −1.5, 6 − (1+2)/2 = 4.5
    # prompt B's (0, 0, 3): −1.5, −1.5, 3; a constant added to one prompt's scores changes nothing
    s = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    assert L.group_centered(s, 3).tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    assert L.group_centered(s + torch.tensor([10.0] * 3 + [-7.0] * 3), 3).tolist() == pytest.approx(
        [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])
    # scaled: prompt B's population std is √2, so (−1.5, −1.5, 3)/√2
    r2 = math.sqrt(2.0)
    assert L.group_centered(s, 3, scale=True)[3:].tolist() == pytest.approx([-1.5 / r2, -1.5 / r2, 3 / r2], rel=1e-5)
    # k = 2: each answer minus the other; k = 1 leaves the scores alone; groups must divide the batch
    assert L.group_centered(torch.tensor([1.0, 4.0]), 2).tolist() == [-3.0, 3.0]
    assert L.group_centered(s, 1).tolist() == s.tolist()
    with pytest.raises(ValueError):
        L.group_centered(s, 4)


def test_ppo_policy_loss_clips():
    # ratio 1.5, A = +1: min(1.5, 1.2) = 1.2 (clipped); ratio 1.5, A = −1: min(−1.5, −1.2) = −1.5 (not clipped)
    # ratio 0.5, A = −1: min(−0.5, −0.8) = −0.8 (clipped). Loss = −mean = (−1.2 + 1.5 + 0.8)/3
    ratio = torch.tensor([[1.5, 1.5, 0.5]])
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    loss, st = L.ppo_policy_loss(ratio.log(), torch.zeros(1, 3), adv, torch.ones(1, 3), clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 0.8) / 3)
    assert st["clipfrac"].item() == pytest.approx(2 / 3)
    # approx KL(old‖new) = mean(ρ − 1 − ln ρ)
    expect = sum(r - 1 - math.log(r) for r in (1.5, 1.5, 0.5)) / 3
    assert st["approx_kl"].item() == pytest.approx(expect, rel=1e-5)


def test_ppo_value_loss_clips():
    # V = 1, V_old = 0.5, R = 2, ε = 0.2: clipped V = 0.7; errors 1 and 1.69 -> ½·1.69
    loss, st = L.ppo_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.845)
    assert st["value_clipfrac"].item() == 1.0
    # inside the clip range both errors agree: V = 0.6, R = 1 -> ½·0.16
    loss, _ = L.ppo_value_loss(torch.tensor([[0.6]]), torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.08)


def test_ptx_loss():
    # uniform over V = 4: NLL ln 4 per token, times γ_ptx = 27.8
    assert L.ptx_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), 27.8).item() == pytest.approx(27.8 * math.log(4))


def test_dpo_loss():
    # β = ½; chosen gains 1 nat over the reference, rejected loses 1: z = ½·(1 − (−1)) = 1 -> ln(1 + e^−1)
    loss, st = L.dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-4.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert st["reward_chosen"].item() == pytest.approx(0.5) and st["reward_rejected"].item() == pytest.approx(-0.5)
    assert st["reward_acc"].item() == 1.0
    # label smoothing ε = 0.1: −0.9 ln σ(1) − 0.1 ln σ(−1)
    loss, _ = L.dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-4.0]), 0.5, 0.1)
    assert loss.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)))


def test_entropy_and_token_logprobs():
    logits = torch.zeros(1, 1, 8)  # uniform over 8: entropy ln 8, log p = −ln 8
    assert L.entropy_from_logits(logits).item() == pytest.approx(math.log(8))
    assert L.token_logprobs(logits, torch.tensor([[3]])).item() == pytest.approx(-math.log(8))

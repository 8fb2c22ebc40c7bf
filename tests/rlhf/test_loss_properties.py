"""Properties of the RLHF math (minichat/losses.py) over random inputs, beside test_losses.py's hand-checked cases:
each function against a direct reference written from its definition, and the invariances it must have."""
from __future__ import annotations

import math
from itertools import combinations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minichat.losses import (
    dpo_loss, gae, group_centered, kl_k1, kl_k2, kl_k3, ppo_policy_loss, ranking_loss, ranking_pairs, whiten,
)

FAST = settings(max_examples=60, deadline=None)
finite = st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False)


def _t(xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


@FAST
@given(st.lists(st.integers(0, 3), min_size=2, max_size=9))
def test_ranking_pairs_are_every_strictly_ordered_pair(ranks):
    pairs = ranking_pairs(ranks)
    ties = sum(math.comb(ranks.count(r), 2) for r in set(ranks))
    assert len(pairs) == math.comb(len(ranks), 2) - ties == len(set(pairs))
    assert all(ranks[w] < ranks[l] for w, l in pairs)


@st.composite
def grouped_pairs(draw):
    n_groups = draw(st.integers(1, 4))
    group = [g for g in range(n_groups) for _ in range(draw(st.integers(1, 6)))]
    r_w = draw(st.lists(finite, min_size=len(group), max_size=len(group)))
    r_l = draw(st.lists(finite, min_size=len(group), max_size=len(group)))
    return _t(r_w), _t(r_l), torch.tensor(group)


@FAST
@given(grouped_pairs(), finite, st.sampled_from(["logsigmoid", "hinge"]))
def test_ranking_loss_is_the_mean_over_prompts_and_ignores_a_common_shift(data, shift, kind):
    r_w, r_l, group = data
    per_pair = [(-math.log(1 / (1 + math.exp(-(w - l)))) if kind == "logsigmoid" else max(0.0, 1.0 - (w - l)))
                for w, l in zip(r_w.tolist(), r_l.tolist())]
    by_group: dict[int, list[float]] = {}
    for g, v in zip(group.tolist(), per_pair):
        by_group.setdefault(g, []).append(v)
    want = sum(sum(v) / len(v) for v in by_group.values()) / len(by_group)
    got = ranking_loss(r_w, r_l, group, kind)
    assert math.isclose(float(got), want, rel_tol=1e-6, abs_tol=1e-9)
    # the reward model is defined only up to a constant: shifting every reward changes nothing
    assert torch.allclose(ranking_loss(r_w + shift, r_l + shift, group, kind), got, atol=1e-9)
    perm = torch.randperm(len(group))  # nor does the order of the pairs
    assert torch.allclose(ranking_loss(r_w[perm], r_l[perm], group[perm], kind), got, atol=1e-9)


@st.composite
def distributions(draw):
    n = draw(st.integers(2, 6))
    logits = [draw(finite) for _ in range(n)]
    ref = [draw(finite) for _ in range(n)]
    return torch.log_softmax(_t(logits), 0), torch.log_softmax(_t(ref), 0)


@FAST
@given(distributions())
def test_kl_estimators_average_to_the_kl_under_the_policy(d):
    logp, logp_ref = d
    p = logp.exp()
    kl = float((p * (logp - logp_ref)).sum())
    assert kl >= -1e-12
    # k1 and k3 are unbiased: their expectation over tokens drawn from π is KL(π‖π_ref) exactly
    assert math.isclose(float((p * kl_k1(logp, logp_ref)).sum()), kl, abs_tol=1e-9)
    assert math.isclose(float((p * kl_k3(logp, logp_ref)).sum()), kl, abs_tol=1e-9)
    # k2 and k3 are never negative, and every estimator is 0 where the two models agree
    assert (kl_k2(logp, logp_ref) >= 0).all() and (kl_k3(logp, logp_ref) >= -1e-12).all()
    for k in (kl_k1, kl_k2, kl_k3):
        assert torch.allclose(k(logp, logp), torch.zeros_like(logp))


@st.composite
def answers(draw):
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 7))
    lens = [draw(st.integers(1, T)) for _ in range(B)]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lens], dtype=torch.float64)
    rewards = _t([[draw(finite) for _ in range(T)] for _ in range(B)])
    values = _t([[draw(finite) for _ in range(T)] for _ in range(B)])
    return rewards, values, mask, lens


@FAST
@given(answers(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_is_the_discounted_sum_of_td_errors(data, gamma, lam):
    rewards, values, mask, lens = data
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lens):
        v = values[b, :n].tolist() + [0.0]  # the answer's end is terminal
        delta = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            want = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
            assert math.isclose(adv[b, t].item(), want, rel_tol=1e-9, abs_tol=1e-9)
            if lam == 1.0:  # then the return is the discounted reward-to-go, whatever the values
                togo = sum(gamma ** k * rewards[b, t + k].item() for k in range(n - t))
                assert math.isclose(ret[b, t].item(), togo, rel_tol=1e-9, abs_tol=1e-9)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


@FAST
@given(answers())
def test_whiten_gives_zero_mean_unit_variance_on_the_answer_tokens(data):
    x, _, mask, _ = data
    m = mask.bool()
    if m.sum() < 2 or x[m].var(unbiased=False) < 1e-3:
        return
    w = whiten(x, mask)
    assert abs(float(w[m].mean())) < 1e-6 and math.isclose(float(w[m].var(unbiased=False)), 1.0, rel_tol=1e-4)
    assert (w[~m] == 0).all()


@FAST
@given(st.integers(2, 5), st.integers(1, 4), st.data())
def test_group_centered_is_each_score_minus_the_others_mean(k, n_groups, data):
    scores = _t(data.draw(st.lists(finite, min_size=k * n_groups, max_size=k * n_groups)))
    out = group_centered(scores, k)
    g = scores.view(-1, k)
    for i, j in ((i, j) for i in range(n_groups) for j in range(k)):
        others = torch.cat([g[i, :j], g[i, j + 1:]])
        assert math.isclose(out[i * k + j].item(), (g[i, j] - others.mean()).item(), abs_tol=1e-9)
    assert torch.allclose(out.view(-1, k).sum(1), torch.zeros(n_groups, dtype=out.dtype), atol=1e-9)
    # a prompt's level (a constant added to its k scores) never reaches the advantage
    assert torch.allclose(group_centered(scores + 3.0, k), out, atol=1e-9)


@FAST
@given(answers(), st.floats(0.05, 0.5))
def test_ppo_policy_loss_at_the_old_policy_and_beyond_the_clip(data, clip):
    adv, old_logp, mask, _ = data
    loss, stats = ppo_policy_loss(old_logp.clone(), old_logp, adv, mask, clip)
    n = mask.sum()
    assert math.isclose(float(loss), float(-(adv * mask).sum() / n), rel_tol=1e-9, abs_tol=1e-12)
    assert float(stats["clipfrac"]) == 0.0 and abs(float(stats["approx_kl"])) < 1e-12
    # where the ratio has left the trust region in the advantage's direction, the loss is flat (no gradient)
    logp = (old_logp + torch.sign(adv) * 2 * clip).requires_grad_()
    ppo_policy_loss(logp, old_logp, adv, mask, clip)[0].backward()
    assert torch.allclose(logp.grad, torch.zeros_like(logp))
    # inside it, the gradient is -A·ρ/N per answer token
    logp = old_logp.clone().requires_grad_()
    ppo_policy_loss(logp, old_logp, adv, mask, clip)[0].backward()
    assert torch.allclose(logp.grad, -adv * mask / n, atol=1e-12)


@FAST
@given(st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=5), st.floats(0.01, 1.0),
       st.floats(0.0, 0.5))
def test_dpo_loss_swapping_the_answers_mirrors_the_label_smoothing(rows, beta, eps):
    pi_w, pi_l, ref_w, ref_l = (_t(c) for c in zip(*rows))
    a, _ = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta, eps)
    b, _ = dpo_loss(pi_l, pi_w, ref_l, ref_w, beta, 1.0 - eps)
    assert math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    # the reference model's log-probabilities shift the implicit reward: moving both models alike changes nothing
    c, _ = dpo_loss(pi_w + 1.5, pi_l - 0.5, ref_w + 1.5, ref_l - 0.5, beta, eps)
    assert math.isclose(float(a), float(c), rel_tol=1e-6, abs_tol=1e-9)


def test_the_pair_count_matches_instructgpt_k_choose_2():
    for k in range(4, 10):
        assert len(ranking_pairs(list(range(k)))) == math.comb(k, 2) == len(list(combinations(range(k), 2)))

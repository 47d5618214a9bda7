"""Pure loss functions of the preference and RL algorithms: hand-derived values and limit cases (each number is
worked out in the comment beside it)."""

import math

import pytest
import torch

from tuneforge.algorithms import dpo, grpo, orpo, ppo, reward

T = torch.tensor


def test_dpo_sigmoid_cdpo_and_ipo_golden_values():
    pc, pr, rc, rr = T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5])
    # delta = (−1 − −1.5) − (−2 − −1.5) = 1;  −log σ(0.5 · 1) = log(1 + e^−0.5) = 0.474077
    loss, stats = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    assert stats["reward_margin"].item() == pytest.approx(0.5) and stats["preference_accuracy"].item() == 1.0
    # cDPO ε = 0.1: 0.9 · 0.474077 + 0.1 · log(1 + e^0.5) = 0.524077
    loss, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5)), abs=1e-6)
    # IPO with 2 chosen / 4 rejected tokens: Δ = 0.5/2 + 0.5/4 = 0.375; (0.375 − 1/(2·0.5))² = 0.390625
    loss, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", chosen_tokens=T([2.0]),
                           rejected_tokens=T([4.0]))
    assert loss.item() == pytest.approx(0.390625, abs=1e-6)


def test_dpo_policy_equal_to_reference_gives_log_2():
    x = torch.randn(5)
    loss, stats = dpo.dpo_loss(x, x - 1, x, x - 1, beta=0.3)
    assert torch.allclose(loss, torch.full((5,), math.log(2.0)))
    assert torch.equal(stats["reward_margin"], torch.zeros(5))


def test_orpo_golden_value_and_lambda_zero_is_sft():
    # P_w = 0.5 -> odds 1; P_l = 0.25 -> odds 1/3; log odds ratio = log 3; L_OR = −log σ(log 3) = log(4/3)
    l_or, log_odds = orpo.odds_ratio_loss(T([math.log(0.5)]), T([math.log(0.25)]))
    assert log_odds.item() == pytest.approx(math.log(3.0), abs=1e-6)
    assert l_or.item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    nll = T([0.7, 1.3])
    loss, _ = orpo.orpo_loss(nll, T([-0.5, -0.2]), T([-0.9, -0.1]), lam=0.0)
    assert loss.item() == pytest.approx(1.0)


def test_log1mexp_is_finite_near_zero_and_far_away():
    x = T([-1e-8, -0.5, -50.0])
    assert torch.allclose(orpo.log1mexp(x.double()), torch.log(1 - torch.exp(x.double())), rtol=1e-6)
    assert torch.isfinite(orpo.log1mexp(T([-1e-30]))).all()


def _old_odds_ratio_loss(c, r):
    """The formula before the P → 1 fix (a textbook ``where`` over both branches), kept as the reference."""
    def lme(x):
        return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return -torch.nn.functional.logsigmoid((c - r) - (lme(c) - lme(r)))


def test_orpo_loss_and_gradient_are_finite_when_the_policy_is_certain():
    # P_w = 1 (mean log-prob 0) and just below it: the old formula's gradient was NaN here (skipped steps)
    c = T([0.0, -1e-9, -1e-7, 0.0, -1e-30], requires_grad=True)
    r = T([-1.0, -1.0, -1.0, 0.0, -2.0], requires_grad=True)
    l_or, _ = orpo.odds_ratio_loss(c, r)
    l_or.sum().backward()
    assert torch.isfinite(l_or).all() and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    c0, r0 = T([0.0, -1e-9], requires_grad=True), T([-1.0, -1.0])
    _old_odds_ratio_loss(c0, r0).sum().backward()
    assert torch.isnan(c0.grad).all()  # what the fix removes
    # golden, P_w capped one fp32 ulp below 1: log(1 − P_w) = log ε = −15.942385, log(1 − e^−1) = −0.458675;
    # log odds = 1 + 15.942385 − 0.458675 = 16.483710; L = log(1 + e^−16.483710) = 6.9377e-8
    assert l_or[0].item() == pytest.approx(math.log1p(math.exp(-16.483710)), rel=1e-4)
    assert l_or[3].item() == pytest.approx(math.log(2.0), abs=1e-7)  # both certain: no preference, log 2
    assert c.grad[3].item() == pytest.approx(-0.5, abs=1e-6) and r.grad[3].item() == pytest.approx(0.5, abs=1e-6)
    # within one ulp of P = 1 the loss is ~1e-7: any cap moves it by less than 1e-6
    assert torch.allclose(l_or[:3], _old_odds_ratio_loss(c, r)[:3].detach(), atol=1e-6)


def test_orpo_loss_is_unchanged_away_from_certainty():
    g = torch.Generator().manual_seed(1)
    c = -torch.rand(256, generator=g) * 5 - 1.2e-7
    r = torch.cat([-torch.rand(128, generator=g) * 5, -torch.rand(128, generator=g) * 1e-3]) - 1.2e-7
    for dtype in (torch.float32, torch.float64):
        cc, rr = c.to(dtype).requires_grad_(), r.to(dtype).requires_grad_()
        ours, _ = orpo.odds_ratio_loss(cc, rr)
        old = _old_odds_ratio_loss(cc.float(), rr.float())
        assert torch.allclose(ours, old, atol=1e-6, rtol=0)
        g_new = torch.autograd.grad(ours.sum(), (cc, rr))
        g_old = torch.autograd.grad(old.sum(), (cc, rr))
        assert all(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6) for a, b in zip(g_new, g_old))


def test_orpo_matches_trl_odds_ratio_loss():
    trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    c, r = -torch.rand(64, generator=g) * 3, -torch.rand(64, generator=g) * 3
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    theirs = trl_orpo.ORPOTrainer.odds_ratio_loss(fake, c, r)[0]  # beta · log σ(log odds)
    ours, _ = orpo.odds_ratio_loss(c, r)
    assert torch.allclose(ours, -theirs / 0.25, atol=1e-6)


def test_bradley_terry_golden_values_and_ranking_pairs():
    losses, stats = reward.bradley_terry_loss(T([2.0, 0.0]), T([1.0, 1.0]))
    # −log σ(1) = log(1 + e^−1) = 0.313262; −log σ(−1) = 1.313262
    assert torch.allclose(losses, T([math.log1p(math.exp(-1)), math.log1p(math.exp(1))]), atol=1e-6)
    assert stats["pairwise_accuracy"].item() == 0.5
    m_loss, _ = reward.bradley_terry_loss(T([2.0]), T([1.0]), margin=1.0)
    assert m_loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert reward.ranking_pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert len(reward.ranking_pairs(list(range(5)))) == 10
    with pytest.raises(ValueError):
        reward.ranking_pairs(["a"])


def test_grpo_advantages_golden_and_equal_rewards_give_zero():
    # group [1, 0]: mean 0.5, sample std 0.70711 -> ±0.5/(0.70711 + 1e-4)
    adv = grpo.group_advantages(T([1.0, 0.0, 3.0, 3.0]), group_size=2)
    expect = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert torch.allclose(adv, T([expect, -expect, 0.0, 0.0]), atol=1e-6)
    assert torch.equal(grpo.group_advantages(T([2.0, 0.0]), 2, scale_rewards=False), T([1.0, -1.0]))
    with pytest.raises(ValueError):
        grpo.group_advantages(T([1.0, 2.0, 3.0]), 2)


def test_grpo_loss_normalisations_at_ratio_one():
    logp = torch.zeros(2, 2)
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    adv = T([1.0, -0.5])
    # per-token loss = −A: response means [−1, 0.5] -> grpo = −0.25; dr_grpo = (−1·2 + 0.5·1)/(2·2) = −0.375
    loss, stats = grpo.grpo_loss(logp, logp, None, adv, mask, loss_type="grpo")
    assert loss.item() == pytest.approx(-0.25) and stats["clip_fraction"].item() == 0.0
    loss, _ = grpo.grpo_loss(logp, logp, None, adv, mask, loss_type="dr_grpo")
    assert loss.item() == pytest.approx(-0.375)


def test_k3_kl_is_zero_when_equal_and_positive_otherwise():
    a = torch.randn(100)
    assert torch.equal(grpo.k3_kl(a, a), torch.zeros(100))
    assert (grpo.k3_kl(a, a + torch.randn(100)) >= 0).all()
    # ref − logp = log 2: 2 − log 2 − 1 = 0.306853
    assert grpo.k3_kl(T(0.0), T(math.log(2.0))).item() == pytest.approx(1 - math.log(2.0), abs=1e-6)


def test_grpo_clipping_stops_the_gradient_beyond_the_trust_region():
    logp = torch.full((1, 1), math.log(1.5), requires_grad=True)  # ratio 1.5 > 1 + 0.2, positive advantage
    loss, stats = grpo.grpo_loss(logp, torch.zeros(1, 1), None, T([1.0]), torch.ones(1, 1), clip_eps=0.2)
    loss.backward()
    assert logp.grad.item() == 0.0 and stats["clip_fraction"].item() == 1.0


def test_ppo_gae_golden_values():
    rewards, values, mask = T([[0.0, 1.0, 0.0]]), T([[0.5, 0.2, 9.0]]), T([[1.0, 1.0, 0.0]])
    # t=1: δ = 1 + 0 − 0.2 = 0.8; t=0: δ = 0 + 0.2 − 0.5 = −0.3 -> Â0 = −0.3 + 0.8 = 0.5 (γ = λ = 1)
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, T([[0.5, 0.8, 0.0]])) and torch.allclose(ret, T([[1.0, 1.0, 0.0]]))
    adv, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)  # Â0 = −0.3 + 0.5 · 0.8 = 0.1
    assert adv[0, 0].item() == pytest.approx(0.1)


def test_ppo_at_ratio_one_is_minus_mean_advantage_and_value_loss_clips():
    adv, mask = T([[1.0, 3.0, 7.0]]), T([[1.0, 1.0, 0.0]])
    logp = torch.randn(1, 3)
    assert ppo.policy_loss(logp, logp, adv, mask).item() == pytest.approx(-2.0)
    # V = 1, V_old = 0, R = 0.5, ε = 0.2: max((0.5)², (0.2 − 0.5)²) / 2 = 0.125
    assert ppo.value_loss(T([[1.0]]), T([[0.0]]), T([[0.5]]), T([[1.0]])).item() == pytest.approx(0.125)


def test_kl_penalised_rewards_put_the_score_on_the_last_response_token():
    r = ppo.kl_penalised_rewards(T([2.0]), T([[-1.0, -1.0, 0.0]]), T([[-1.5, -0.5, 0.0]]), T([[1.0, 1.0, 0.0]]),
                                 kl_coef=0.1)
    assert torch.allclose(r, T([[-0.05, 2.05, 0.0]]))

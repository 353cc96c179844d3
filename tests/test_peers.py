"""A*-PO and OAPL, ratio-free peers of GVPO, against hand computations, their closed-form optima and invariances."""

import math

import pytest
import torch

from gvpo.losses import astar_po_loss, group_soft_value, leave_one_out_soft_value, oapl_loss


pytestmark = pytest.mark.usefixtures("float64_by_default")  # conftest.py


# Six responses, T = 2: a group of two (id 3), a group of three (id 8) and a singleton (id 1), interleaved.
IDS = [8, 3, 1, 8, 3, 8]
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 0.5]
LOGPS = [[-0.5, -1.0], [-0.2, -9.0], [-0.3, -0.4], [-1.5, -0.1], [-0.8, -0.6], [-0.9, -2.0]]
OLD = [[-0.7, -0.6], [-0.1, -5.0], [-0.3, -0.3], [-1.0, -0.4], [-0.8, -0.2], [-1.1, -1.2]]
MASK = [[1, 1], [1, 0], [1, 1], [1, 1], [1, 1], [1, 0]]


def tiny_batch():
    logps = torch.tensor(LOGPS, requires_grad=True)
    return logps, torch.tensor(OLD), torch.tensor(MASK), torch.tensor(REWARDS), torch.tensor(IDS)


def hand_values(beta1):
    """V_i with plain floats: beta1 * log of the mean of exp(R_j / beta1) over the other members of i's group."""
    out = []
    for i, g in enumerate(IDS):
        others = [REWARDS[j] for j in range(len(IDS)) if IDS[j] == g and j != i]
        out.append(beta1 * math.log(sum(math.exp(r / beta1) for r in others) / len(others)) if others else None)
    return out


def test_soft_value_by_hand_and_in_closed_form():
    v = leave_one_out_soft_value(torch.tensor(REWARDS), torch.tensor(IDS), 0.5)
    # group 3, rewards (0, 1): each response's value is the other's reward exactly (one other response)
    assert v[1].item() == pytest.approx(1.0, abs=1e-15) and v[4].item() == pytest.approx(0.0, abs=1e-15)
    # group 8, rewards (1, 0, 0.5): row 0 sees (0, 0.5) -> 0.5 * log((1 + e) / 2)
    assert v[0].item() == pytest.approx(0.5 * math.log((1 + math.e) / 2), rel=1e-14)
    assert v[3].item() == pytest.approx(0.5 * math.log((math.exp(2) + math.e) / 2), rel=1e-14)
    assert v[5].item() == pytest.approx(0.5 * math.log((math.exp(2) + 1) / 2), rel=1e-14)
    assert v[2].item() == -math.inf  # a singleton has nothing to estimate from


def test_soft_value_limits_and_stability():
    r, ids = torch.tensor([0.0, 1.0, 0.25, 1.0, 0.0]), torch.tensor([0, 0, 0, 0, 0])
    hot = leave_one_out_soft_value(r, ids, 1e4)  # beta1 -> inf: the mean of the others (RLOO's baseline)
    cold = leave_one_out_soft_value(r, ids, 1e-3)  # beta1 -> 0: the max of the others
    loo_mean = [(r.sum() - r[i]).item() / 4 for i in range(5)]
    loo_max = [max(r[j].item() for j in range(5) if j != i) for i in range(5)]
    torch.testing.assert_close(hot, torch.tensor(loo_mean), rtol=0, atol=1e-4)
    # at beta1 = 1e-3 the max is reached up to beta1 * log(count of maxima / (k - 1))
    torch.testing.assert_close(cold, torch.tensor(loo_max), rtol=0, atol=2e-3)
    # a subtraction of exponentials would give log(0) here: e^(1/1e-3) overflows and the others underflow
    extreme = leave_one_out_soft_value(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1, 1, 1]), 1e-3)
    assert torch.isfinite(extreme).all()
    assert extreme.tolist() == pytest.approx([-1e-3 * math.log(1.0), 1.0 - 1e-3 * math.log(2), 1.0 - 1e-3 * math.log(2)])


@pytest.mark.parametrize("beta1,beta2", [(0.5, 0.1), (2.0, 1e-3)])
def test_value_and_gradient_by_hand(beta1, beta2):
    logps, old, mask, rewards, ids = tiny_batch()
    loss, metrics = astar_po_loss(logps, old, mask, rewards, ids, beta1=beta1, beta2=beta2)
    (grad,) = torch.autograd.grad(loss, logps)

    values = hand_values(beta1)
    used = [i for i, v in enumerate(values) if v is not None]
    n = len(used)
    residual = {}
    for i in used:
        s = sum(LOGPS[i][t] for t in range(2) if MASK[i][t])
        o = sum(OLD[i][t] for t in range(2) if MASK[i][t])
        residual[i] = beta2 * (s - o) - (REWARDS[i] - values[i])
    expected = sum(d * d for d in residual.values()) / n
    assert loss.item() == pytest.approx(expected, rel=1e-13)
    # d/d logps[i, t] of (1/n) sum_i d_i^2 = 2 beta2 d_i / n on completion tokens, 0 elsewhere and for the singleton
    hand_grad = [[2 * beta2 * residual[i] / n * MASK[i][t] if i in residual else 0.0 for t in range(2)]
                 for i in range(len(IDS))]
    torch.testing.assert_close(grad, torch.tensor(hand_grad), rtol=1e-12, atol=1e-15)
    assert metrics["sequences_used"].item() == 5 and metrics["sequences_skipped"].item() == 1
    assert metrics["loss"].item() == pytest.approx(expected, rel=1e-13) and metrics["loss"].requires_grad is False
    assert all(m.dim() == 0 for m in metrics.values())
    mean_v = sum(values[i] for i in used) / n
    assert metrics["v_star_mean"].item() == pytest.approx(mean_v, rel=1e-13)


def test_on_policy_gradient_is_reinforce_with_a_leave_one_out_soft_baseline():
    """With pi_ref = the current policy (old_policy previous, one update per batch) the log-ratio is 0 and the
    gradient is -2 beta2 / n * (R_i - V_i) grad s_i."""
    logps, _, mask, rewards, ids = tiny_batch()
    loss, _ = astar_po_loss(logps, logps.detach(), mask, rewards, ids, beta1=0.5, beta2=0.01)
    (grad,) = torch.autograd.grad(loss, logps)
    values = hand_values(0.5)
    hand = [[-2 * 0.01 * (REWARDS[i] - values[i]) / 5 * MASK[i][t] if values[i] is not None else 0.0
             for t in range(2)] for i in range(len(IDS))]
    torch.testing.assert_close(grad, torch.tensor(hand), rtol=1e-12, atol=1e-15)


def test_invariances():
    logps, old, mask, rewards, ids = tiny_batch()
    loss, _ = astar_po_loss(logps, old, mask, rewards, ids, beta1=0.5, beta2=0.1)
    (grad,) = torch.autograd.grad(loss, logps)

    # any order of the rows, any integer ids
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    relabel = {8: -40, 3: 1000, 1: 7}
    p_ids = torch.tensor([relabel[i] for i in ids[perm].tolist()])
    p_logps = logps.detach()[perm].clone().requires_grad_()
    p_loss, _ = astar_po_loss(p_logps, old[perm], mask[perm], rewards[perm], p_ids, beta1=0.5, beta2=0.1)
    (p_grad,) = torch.autograd.grad(p_loss, p_logps)
    assert p_loss.item() == pytest.approx(loss.item(), rel=1e-14)
    torch.testing.assert_close(p_grad, grad[perm], rtol=1e-13, atol=0)

    # a constant added to one group's rewards moves its V by the same constant: nothing changes
    shifted = rewards + 3.0 * (ids == 8)
    s_loss, _ = astar_po_loss(logps, old, mask, shifted, ids, beta1=0.5, beta2=0.1)
    assert s_loss.item() == pytest.approx(loss.item(), rel=1e-12)

    # a mean over responses: the batch next to a relabelled copy of itself has the same loss
    twice = [torch.cat([x, x]) for x in (logps.detach(), old, mask, rewards)]
    d_loss, _ = astar_po_loss(*twice, torch.cat([ids, ids + 100]), beta1=0.5, beta2=0.1)
    assert d_loss.item() == pytest.approx(loss.item(), rel=1e-13)

    # padding beyond the mask (even -inf) is ignored
    padded = logps.detach().clone()
    padded[mask == 0] = -math.inf
    i_loss, _ = astar_po_loss(padded, old, mask, rewards, ids, beta1=0.5, beta2=0.1)
    assert i_loss.item() == pytest.approx(loss.item(), rel=1e-14)


def test_loss_and_gradient_are_zero_at_the_regression_target():
    logps, old, mask, rewards, ids = tiny_batch()
    beta1, beta2 = 0.5, 0.1
    values = hand_values(beta1)
    target = logps.detach().clone()
    for i, v in enumerate(values):
        if v is None:
            continue
        # put the whole required log-ratio (R_i - V_i) / beta2 on the first token
        s_rest = sum(LOGPS[i][t] for t in range(1, 2) if MASK[i][t])
        o = sum(OLD[i][t] for t in range(2) if MASK[i][t])
        target[i, 0] = o + (REWARDS[i] - v) / beta2 - s_rest
    target.requires_grad_()
    loss, _ = astar_po_loss(target, old, mask, rewards, ids, beta1=beta1, beta2=beta2)
    (grad,) = torch.autograd.grad(loss, target)
    assert loss.item() < 1e-24 and grad.abs().max().item() < 1e-12
    off, _ = astar_po_loss(target.detach() + 0.01 * mask, old, mask, rewards, ids, beta1=beta1, beta2=beta2)
    assert off.item() > 1e-8  # a strict minimum


def test_minimiser_is_the_kl_regularised_optimum_when_v_star_is_exact():
    """One prompt, four possible responses with known pi_ref. With V* = beta log E_ref exp(R / beta) given and
    beta1 = beta2 = beta, minimising the loss over a free softmax policy reaches pi_ref exp(R / beta) / Z."""
    beta = 0.5
    ref = torch.tensor([0.4, 0.3, 0.2, 0.1])
    rewards = torch.tensor([0.0, 1.0, 0.3, 1.0])
    z = sum(p * math.exp(r / beta) for p, r in zip(ref.tolist(), rewards.tolist()))
    optimum = [p * math.exp(r / beta) / z for p, r in zip(ref.tolist(), rewards.tolist())]
    v_star = torch.full((4,), beta * math.log(z))
    logits = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(1500):
        logp = torch.log_softmax(logits, 0)[:, None]  # each response once, one "token"
        loss, _ = astar_po_loss(logp, ref.log()[:, None], torch.ones(4, 1), rewards, torch.zeros(4, dtype=torch.long),
                                beta1=beta, beta2=beta, v_star=v_star)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-12
    torch.testing.assert_close(torch.softmax(logits, 0), torch.tensor(optimum), rtol=0, atol=1e-6)


def test_v_star_given_is_used_as_is_and_singletons_count():
    logps, old, mask, rewards, ids = tiny_batch()
    v = torch.tensor([0.3, -0.2, 0.9, 0.3, -0.2, 0.3])
    loss, metrics = astar_po_loss(logps, old, mask, rewards, ids, beta1=0.5, beta2=0.1, v_star=v)
    hand = 0.0
    for i in range(6):
        s = sum(LOGPS[i][t] for t in range(2) if MASK[i][t])
        o = sum(OLD[i][t] for t in range(2) if MASK[i][t])
        hand += (0.1 * (s - o) - (REWARDS[i] - v[i].item())) ** 2
    assert loss.item() == pytest.approx(hand / 6, rel=1e-13)
    assert metrics["sequences_used"].item() == 6 and metrics["sequences_skipped"].item() == 0


def test_num_sequences_makes_micro_batches_add_up():
    logps, old, mask, rewards, ids = tiny_batch()
    whole, _ = astar_po_loss(logps, old, mask, rewards, ids)
    parts = 0.0
    for chunk in ([8], [3, 1]):  # whole groups per micro-batch; 5 responses in groups of >= 2 overall
        rows = torch.tensor([i in chunk for i in ids.tolist()])
        part, _ = astar_po_loss(logps[rows], old[rows], mask[rows], rewards[rows], ids[rows], num_sequences=5)
        parts = parts + part
    assert parts.item() == pytest.approx(whole.item(), rel=1e-13)
    (g_whole,) = torch.autograd.grad(whole, logps)
    (g_parts,) = torch.autograd.grad(parts, logps)
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-12, atol=1e-16)


def test_all_singletons_give_a_connected_zero():
    logps = torch.randn(3, 4, requires_grad=True)
    loss, metrics = astar_po_loss(logps, torch.randn(3, 4), torch.ones(3, 4), torch.tensor([1.0, 0.0, 1.0]),
                                  torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and logps.grad.abs().max().item() == 0.0
    assert metrics["sequences_used"].item() == 0 and metrics["sequences_skipped"].item() == 3


def test_float32_matches_float64():
    logps, old, mask, rewards, ids = tiny_batch()
    l64, _ = astar_po_loss(logps, old, mask, rewards, ids, beta1=0.5, beta2=0.1)
    l32, _ = astar_po_loss(logps.detach().float(), old.float(), mask, rewards.float(), ids, beta1=0.5, beta2=0.1)
    assert l32.dtype == torch.float32 and l32.item() == pytest.approx(l64.item(), rel=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta1=0.0), "beta1=0.0"),
    (dict(beta2=-1e-3), "beta2=-0.001"),
    (dict(v_star=torch.zeros(5)), "v_star: expected a finite tensor of shape \\(6,\\)"),
    (dict(v_star=torch.tensor([0.0, 0.0, math.nan, 0.0, 0.0, 0.0])), "v_star: expected a finite"),
    (dict(rewards=torch.tensor([1.0, math.nan, 0.0, 0.0, 1.0, 0.5])), "rewards: non-finite"),
    (dict(group_ids=torch.tensor([8.0, 3, 1, 8, 3, 8])), "group_ids: expected an integer"),
    (dict(old_logps=torch.zeros(6, 3)), "old_logps: expected shape \\(6, 2\\)"),
])
def test_bad_input_names_the_argument(kwargs, match):
    logps, old, mask, rewards, ids = tiny_batch()
    args = dict(logps=logps, old_logps=old, mask=mask, rewards=rewards, group_ids=ids)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        astar_po_loss(**args)


def test_on_policy_with_a_flat_soft_value_the_gradient_is_gvpos_times_2_beta2_over_beta():
    """pi_ref = the sampler (R_theta = 0), beta1 -> inf (V = the others' mean), equal group sizes:
    R_i - mean_{-i} R = k / (k - 1) (R_i - mean R), so A*-PO's gradient is GVPO's scaled by 2 beta2 / beta."""
    from gvpo.losses import gvpo_loss

    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 1, 2] * 4)[torch.randperm(12, generator=g)]
    logps = (-torch.rand(12, 5, generator=g) * 2).requires_grad_()
    mask = (torch.rand(12, 5, generator=g) > 0.3).long()
    rewards = torch.randint(0, 3, (12,), generator=g).double()
    a, _ = astar_po_loss(logps, logps.detach(), mask, rewards, ids, beta1=1e7, beta2=1e-3)
    b, _ = gvpo_loss(logps, logps.detach(), mask, rewards, ids, beta=0.1)
    (ga,) = torch.autograd.grad(a, logps)
    (gb,) = torch.autograd.grad(b, logps)
    assert gb.abs().max() > 1e-3
    torch.testing.assert_close(ga, gb * (2 * 1e-3 / 0.1), rtol=1e-5, atol=1e-9)


def test_config_selects_astar_po_with_the_initial_model_as_reference():
    from gvpo.config import load_config

    c = load_config(None, ["algorithm=astar_po"])
    assert c.old_policy_mode() == "initial" and (c.algorithm.beta1, c.algorithm.beta2) == (0.5, 1e-3)
    assert load_config(None, ["algorithm=astar_po", "old_policy=behaviour"]).old_policy_mode() == "behaviour"
    with pytest.raises(ValueError, match="beta1/beta2=\\(0.0, 0.001\\): A\\*-PO needs both > 0"):
        load_config(None, ["algorithm=astar_po", "beta1=0"])


def test_astar_po_anchored_at_a_lagged_behaviour_policy_trains_cleanly(tmp_path, tiny_model_dir):
    """pi_ref = the lagged sampler (old_policy=behaviour, simulated_policy_lag=2): the regression is active at
    every update (R_theta != 0) and the run stays finite. A smoke test, not a claim about OAPL."""
    from test_trainer import ROWS, config_for, read, sevens

    from gvpo.trainer import train

    torch.set_default_dtype(torch.float32)
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=4, algorithm="astar_po", old_policy="behaviour",
                     simulated_policy_lag=2, beta2=0.1)
    summary = train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])
    rows = [r for r in read(tmp_path / "run") if "loss" in r]
    assert summary["skipped_updates"] == 0 and all(math.isfinite(r["loss"]) for r in rows)
    assert abs(rows[-1]["implicit_reward_mean"]) > 1e-4  # the log-ratio to the lagged policy is not 0


# ---------------------------------------------------------------------------------------------------------------
# OAPL: A*-PO's regression anchored at the lagged sampler pi_vllm, V from the whole group (y_i included).


def test_oapl_group_value_by_hand():
    v = group_soft_value(torch.tensor(REWARDS), torch.tensor(IDS), 1.0)
    assert v[1].item() == v[4].item() == pytest.approx(0.6201145069582775, rel=1e-14)  # log((1 + e) / 2)
    g8 = math.log((math.e + 1 + math.exp(0.5)) / 3)  # rewards (1, 0, 0.5), each response's own included
    assert [v[0].item(), v[3].item(), v[5].item()] == pytest.approx([g8] * 3, rel=1e-14)
    assert v[2].item() == pytest.approx(1.0, rel=1e-14)  # a singleton's value is its own reward
    big = group_soft_value(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([5, 5, 5]), 1e-3)  # no overflow
    assert big.tolist() == pytest.approx([1.0 - 1e-3 * math.log(3)] * 3, rel=1e-12)


@pytest.mark.parametrize("beta1,beta2", [(1.0, 1e-3), (0.5, 0.1)])
def test_oapl_value_and_gradient_by_hand(beta1, beta2):
    logps, old, mask, rewards, ids = tiny_batch()
    loss, metrics = oapl_loss(logps, old, mask, rewards, ids, beta1=beta1, beta2=beta2)
    (grad,) = torch.autograd.grad(loss, logps)

    residual = []
    for i, g in enumerate(IDS):
        group = [REWARDS[j] for j in range(len(IDS)) if IDS[j] == g]  # y_i's own reward included
        v = beta1 * math.log(sum(math.exp(r / beta1) for r in group) / len(group))
        s = sum(LOGPS[i][t] for t in range(2) if MASK[i][t])
        o = sum(OLD[i][t] for t in range(2) if MASK[i][t])
        residual.append(beta2 * (s - o) - (REWARDS[i] - v))
    n = len(IDS)  # every response counts, the singleton (target log-ratio 0) included
    assert loss.item() == pytest.approx(sum(d * d for d in residual) / n, rel=1e-13)
    hand_grad = [[2 * beta2 * residual[i] / n * MASK[i][t] for t in range(2)] for i in range(n)]
    torch.testing.assert_close(grad, torch.tensor(hand_grad), rtol=1e-12, atol=1e-15)
    assert metrics["sequences_used"].item() == 6 and metrics["sequences_skipped"].item() == 0


def test_oapl_minimiser_is_the_kl_regularised_optimum_against_the_sampler():
    """The paper's claim: the loss's minimiser is pi_vllm exp(R / beta) / Z, the optimum of
    E[R] - beta KL(pi || pi_vllm), whatever policy the learner starts from. A group whose response counts are
    pi_vllm's probabilities (4, 3, 2, 1 of 10) makes the group's V exactly beta log Z; beta1 = beta2 = beta."""
    beta = 0.5
    sampler = torch.tensor([0.4, 0.3, 0.2, 0.1])
    reward_of = torch.tensor([0.0, 1.0, 0.3, 1.0])
    z = sum(p * math.exp(r / beta) for p, r in zip(sampler.tolist(), reward_of.tolist()))
    optimum = [p * math.exp(r / beta) / z for p, r in zip(sampler.tolist(), reward_of.tolist())]
    responses = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    old = sampler.log()[responses, None]
    logits = torch.tensor([0.0, 2.0, -1.0, 1.0], requires_grad=True)  # a learner far from the sampler
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(1500):
        logp = torch.log_softmax(logits, 0)[responses, None]
        loss, _ = oapl_loss(logp, old, torch.ones(10, 1), reward_of[responses], torch.zeros(10, dtype=torch.long),
                            beta1=beta, beta2=beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-12
    torch.testing.assert_close(torch.softmax(logits, 0), torch.tensor(optimum), rtol=0, atol=1e-6)


def test_oapl_objective_micro_batches_add_up_to_the_mean_over_every_response():
    from gvpo.config import AlgorithmConfig
    from gvpo.objectives import OBJECTIVES, LossInputs

    cfg = AlgorithmConfig(algorithm="oapl", old_policy="behaviour", beta1=1.0, beta2=0.1)
    logps, old, mask, rewards, ids = tiny_batch()
    counts = dict(groups=2, sequences=6, grouped_sequences=5)
    whole, _ = oapl_loss(logps, old, mask, rewards, ids, beta1=1.0, beta2=0.1)
    parts = 0.0
    for chunk in ([8], [3, 1]):  # whole groups per micro-batch
        rows = torch.tensor([i in chunk for i in ids.tolist()])
        part, _ = OBJECTIVES["oapl"](LossInputs(logps[rows], old[rows], mask[rows], rewards[rows], ids[rows],
                                                **counts), cfg)
        parts = parts + part
    assert parts.item() == pytest.approx(whole.item(), rel=1e-13)


def test_config_selects_oapl_only_anchored_at_the_behaviour_policy():
    from gvpo.config import load_config

    c = load_config(None, ["algorithm=oapl", "old_policy=behaviour", "beta1=1"])
    assert c.old_policy_mode() == "behaviour" and (c.algorithm.beta1, c.algorithm.beta2) == (1.0, 1e-3)
    assert load_config(None, ["algorithm=oapl"]).old_policy_mode() == "behaviour"  # auto: the sampler
    for mode in ("previous", "initial", "ema"):
        with pytest.raises(ValueError, match=f"old_policy='{mode}': OAPL regresses onto log\\(pi_theta / pi_vllm\\)"):
            load_config(None, ["algorithm=oapl", f"old_policy={mode}"])
    with pytest.raises(ValueError, match="beta1=1.0, beta2=0.0: OAPL needs both > 0"):
        oapl_loss(*tiny_batch(), beta1=1.0, beta2=0.0)
    # Groups OAPL has no single sampler for: replayed responses (older policies) and demonstrations (none).
    with pytest.raises(ValueError, match="num_historical=2: OAPL's value V is that of the one policy"):
        load_config(None, ["algorithm=oapl", "num_historical=2"])
    with pytest.raises(ValueError, match="demonstrations_per_group=1: OAPL anchors every response"):
        load_config(None, ["algorithm=oapl", "demonstration_column=solution", "demonstrations_per_group=1"])
    load_config(None, ["algorithm=gvpo", "num_historical=2"])  # GVPO takes mixed groups


def test_oapl_with_a_lagged_sampler_trains_cleanly(tmp_path, tiny_model_dir):
    """pi_vllm = the sampler two versions back (simulated_policy_lag=2): the regression is active (R_theta != 0),
    every response counts, and the run stays finite."""
    from test_trainer import ROWS, config_for, read, sevens

    from gvpo.trainer import train

    torch.set_default_dtype(torch.float32)
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=4, algorithm="oapl", old_policy="behaviour",
                     simulated_policy_lag=2, beta1=1.0, beta2=0.1)
    summary = train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])
    rows = [r for r in read(tmp_path / "run") if "loss" in r]
    assert summary["skipped_updates"] == 0 and all(math.isfinite(r["loss"]) for r in rows)
    assert abs(rows[-1]["implicit_reward_mean"]) > 1e-4 and rows[-1]["sequences_skipped"] == 0

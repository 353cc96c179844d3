"""The loss library against hand computations, a plain-loop reference and the paper's theorems."""

import math

import pytest
import torch

from gvpo.losses import dr_grpo_loss, grpo_loss, gvpo_loss, gvpo_weights, sequence_logps



pytestmark = pytest.mark.usefixtures("float64_by_default")  # conftest.py


def random_batch(seed=0, sizes=(4, 1, 3, 6, 2, 1), T=7, dtype=torch.float64):
    """Groups of mixed sizes (singletons included) under shuffled, non-contiguous ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((k,), 100 + 37 * j) for j, k in enumerate(sizes)])
    perm = torch.randperm(len(ids), generator=g)
    ids = ids[perm]
    B = len(ids)
    logps = (-torch.rand(B, T, generator=g, dtype=dtype) * 3).requires_grad_()
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    rewards = torch.randint(0, 3, (B,), generator=g).to(dtype)
    return logps, old, mask, rewards, ids


def loop_gvpo(logps, old, mask, rewards, ids, beta):
    """Plain-Python transcription of the loss in the GUIDE, one group at a time."""
    losses = []
    for gid in sorted(set(ids.tolist())):
        rows = [i for i in range(len(ids)) if ids[i] == gid]
        k = len(rows)
        if k < 2:
            continue
        rt = [beta * sum((logps[i, t] - old[i, t]) for t in range(logps.shape[1]) if mask[i, t]) for i in rows]
        r = [rewards[i] for i in rows]
        rt_bar, r_bar = sum(rt) / k, sum(r) / k
        losses.append(0.5 / (k - 1) * sum(((rt[j] - rt_bar) - (r[j] - r_bar)) ** 2 for j in range(k)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_gvpo_value_and_gradient_match_loop(seed, beta):
    logps, old, mask, rewards, ids = random_batch(seed)
    loss, metrics = gvpo_loss(logps, old, mask, rewards, ids, beta=beta)
    (grad,) = torch.autograd.grad(loss, logps)
    ref = loop_gvpo(logps, old, mask, rewards, ids, beta)
    (ref_grad,) = torch.autograd.grad(ref, logps)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert metrics["groups_used"].item() == 4 and metrics["groups_skipped"].item() == 2


def test_three_views_agree():
    """MSE form == NLL form -beta/(k-1) sum w_i grad s_i == RL form (beta = 1, covariance/variance terms)."""
    logps, old, mask, rewards, ids = random_batch(3, sizes=(5, 3, 8))
    beta = 0.3
    loss, _ = gvpo_loss(logps, old, mask, rewards, ids, beta=beta)
    (g_mse,) = torch.autograd.grad(loss, logps)

    s, o = sequence_logps(logps, mask), sequence_logps(old, mask)
    w = gvpo_weights(s, o, rewards, ids, beta)
    nll = 0.0
    groups = sorted(set(ids.tolist()))
    for gid in groups:
        sel = ids == gid
        assert w[sel].sum().abs().item() < 1e-12  # weights sum to zero in every group
        nll = nll - beta / (sel.sum() - 1) * (w[sel] * s[sel]).sum()
    (g_nll,) = torch.autograd.grad(nll / len(groups), logps, retain_graph=True)
    torch.testing.assert_close(g_mse, g_nll, rtol=1e-10, atol=1e-12)
    # Since w is constant, the NLL gradient is -beta/(k-1) w_i / G on every completion token of row i.
    k = torch.tensor([int((ids == i).sum()) for i in ids.tolist()], dtype=torch.float64)
    expected = (-beta / (k - 1) * w / len(groups))[:, None] * mask
    torch.testing.assert_close(g_mse, expected, rtol=1e-10, atol=1e-12)

    # RL view (beta = 1): grad of -[Cov(s, R) + Cov(s, o) - 1/2 Var(s)] with Bessel-corrected sample moments.
    loss1, _ = gvpo_loss(logps, old, mask, rewards, ids, beta=1.0)
    (g_mse1,) = torch.autograd.grad(loss1, logps)
    rl = 0.0
    for gid in groups:
        sel = ids == gid
        ss, oo, rr = s[sel], o[sel], rewards[sel]
        cov = lambda a, b: ((a - a.mean()) * (b - b.mean())).sum() / (len(a) - 1)  # noqa: E731
        rl = rl - (cov(ss, rr) + cov(ss, oo) - 0.5 * cov(ss, ss))
    (g_rl,) = torch.autograd.grad(rl / len(groups), logps)
    torch.testing.assert_close(g_mse1, g_rl, rtol=1e-10, atol=1e-12)


def test_listing1_without_detach_gives_a_different_gradient():
    """The paper's Listing 1 trap: weights that carry gradient add a beta^2 term. Our loss has none."""
    logps, old, mask, rewards, ids = random_batch(4, sizes=(4, 4))
    beta = 0.5
    s, o = sequence_logps(logps, mask), sequence_logps(old, mask)
    index_rows = [ids == g for g in sorted(set(ids.tolist()))]
    implicit = beta * (s - o)
    w_live = torch.cat([(rewards[r] - rewards[r].mean()) - (implicit[r] - implicit[r].mean()) for r in index_rows])
    s_sorted = torch.cat([s[r] for r in index_rows])
    wrong = sum(-beta / 3 * (w_live[4 * j:4 * j + 4] * s_sorted[4 * j:4 * j + 4]).sum() for j in range(2)) / 2
    (g_wrong,) = torch.autograd.grad(wrong, logps)
    loss, _ = gvpo_loss(logps, old, mask, rewards, ids, beta=beta)
    (g_right,) = torch.autograd.grad(loss, logps)
    assert (g_wrong - g_right).abs().max() > 1e-3


def test_invariances():
    """Per-group constants in the rewards or in every sequence score of a group (beta log Z) change nothing."""
    logps, old, mask, rewards, ids = random_batch(5)
    loss, _ = gvpo_loss(logps, old, mask, rewards, ids, beta=0.2)
    (grad,) = torch.autograd.grad(loss, logps)
    shift = {g: 10.0 * (j + 1) - 7.3 for j, g in enumerate(sorted(set(ids.tolist())))}
    c = torch.tensor([shift[i] for i in ids.tolist()])

    loss_r, _ = gvpo_loss(logps, old, mask, rewards + c, ids, beta=0.2)
    (grad_r,) = torch.autograd.grad(loss_r, logps)
    # Shift every sequence score of a group by c_g: put it on the first completion token (always in the mask).
    leaf = logps.detach().clone().requires_grad_()
    shifted = leaf + torch.nn.functional.pad(c[:, None], (0, logps.shape[1] - 1))
    loss_z, _ = gvpo_loss(shifted, old, mask, rewards, ids, beta=0.2)
    (grad_z,) = torch.autograd.grad(loss_z, leaf)
    for other, g in ((loss_r, grad_r), (loss_z, grad_z)):
        assert other.item() == pytest.approx(loss.item(), rel=1e-10)
        torch.testing.assert_close(g, grad, rtol=1e-9, atol=1e-12)


def test_unbiased_group_estimate_theorem_3_4():
    """E[2 L_x] = Var_{y ~ pi_s}[R_theta - R]: the 1/(k-1) makes the group estimate unbiased.

    Monte Carlo: 40,000 groups of k = 3; tolerance 4 standard errors. The biased 1/k estimate is off by a
    factor 2/3, far outside that tolerance, so the test can fail.
    """
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    d_s = torch.tensor([0.3, -1.0, 2.0, 0.5])  # R_theta(y) / beta, with o = 0
    r = torch.tensor([1.0, 0.0, 0.5, 2.0])
    beta = 0.7
    d = beta * d_s - r
    pop_var = (probs * (d - (probs * d).sum()) ** 2).sum()

    n, k = 40_000, 3
    y = torch.multinomial(probs, n * k, replacement=True, generator=g)
    ids = torch.arange(n).repeat_interleave(k)
    logps = d_s[y][:, None]
    zeros = torch.zeros_like(logps)
    loss, _ = gvpo_loss(logps, zeros, torch.ones_like(logps), r[y], ids, beta=beta)
    # Per-group estimates for the standard error.
    dy = d[y].view(n, k)
    est = ((dy - dy.mean(1, keepdim=True)) ** 2).sum(1) / (k - 1)
    se = est.std() / math.sqrt(n)
    assert est.mean().item() == pytest.approx(2 * loss.item(), rel=1e-9)
    assert abs(2 * loss.item() - pop_var.item()) < 4 * se.item()
    assert abs(2 * loss.item() * (k - 1) / k - pop_var.item()) > 10 * se.item()


def _train_tabular(loss_name, steps=400, beta=0.5, seed=0):
    """A tabular softmax policy over 6 responses for 3 prompts, trained on groups sampled uniformly."""
    g = torch.Generator().manual_seed(seed)
    P, V, k = 3, 6, 8
    ref_logits = torch.randn(P, V, generator=g)
    ref_logp = torch.log_softmax(ref_logits, -1)
    R = torch.rand(P, V, generator=g)
    target = torch.log_softmax(ref_logp + R / beta, -1)  # pi* = pi_ref exp(R / beta) / Z
    theta = ref_logits.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.05)
    for step in range(steps):
        y = torch.randint(0, V, (P, k), generator=g)  # a sampler unlike pi_theta' (Corollary 3.2)
        prompt = torch.arange(P)[:, None].expand(P, k)
        logp = torch.log_softmax(theta, -1)[prompt, y].reshape(-1, 1)
        old = ref_logp[prompt, y].reshape(-1, 1)
        rewards, ids, mask = R[prompt, y].reshape(-1), prompt.reshape(-1), torch.ones_like(old)
        if loss_name == "gvpo":
            loss, _ = gvpo_loss(logp, old, mask, rewards, ids, beta=beta)
        else:  # GRPO with its ratio against the sampler and a k3 KL to the same reference
            loss, _ = grpo_loss(logp, math.log(1 / V) * torch.ones_like(old), mask, rewards, ids,
                                ref_logps=old, kl_coef=beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    logp = torch.log_softmax(theta.detach(), -1)
    kl = (target.exp() * (target - logp)).sum(-1).mean()
    return kl.item(), theta.detach(), target, ref_logp, R


def test_optimum_is_reached_from_an_off_policy_sampler():
    """Theorem 3.1 + Corollary 3.2: GVPO on uniformly sampled groups converges to pi_ref exp(R/beta)/Z."""
    kl_gvpo, *_ = _train_tabular("gvpo")
    kl_grpo, *_ = _train_tabular("grpo")
    print(f"KL(pi* || pi_theta): GVPO {kl_gvpo:.2e}, GRPO {kl_grpo:.2e}")
    assert kl_gvpo < 1e-3
    assert kl_grpo > 1e-2, f"GRPO reached KL {kl_grpo:.3e}; it has no reason to find pi*"


def test_loss_is_exactly_zero_at_the_optimum():
    """At pi_theta = pi*, R_theta - R = beta log Z(x) is constant within a group: every group's loss is 0."""
    g = torch.Generator().manual_seed(1)
    V, beta = 5, 0.25
    ref_logp = torch.log_softmax(torch.randn(V, generator=g), -1)
    R = torch.randn(V, generator=g)
    opt_logp = torch.log_softmax(ref_logp + R / beta, -1)
    y = torch.randint(0, V, (40,), generator=g)
    ids = torch.randint(0, 6, (40,), generator=g)
    loss, m = gvpo_loss(opt_logp[y][:, None], ref_logp[y][:, None], torch.ones(40, 1), R[y], ids, beta=beta)
    assert abs(loss.item()) < 1e-12 and m["implicit_reward_mse"].item() < 1e-12


def test_grpo_hand_computed_with_clipping():
    # One group, rewards (1, 0): A = +-0.5 / (std + 1e-4), std = sqrt(0.5) (Bessel).
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    old = torch.zeros(2, 2)
    logps = torch.log(torch.tensor([[1.0, 1.5], [0.5, 1.0]])).requires_grad_()
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, m = grpo_loss(logps, old, mask, torch.tensor([1.0, 0.0]), torch.tensor([7, 7]))
    # Row 0 (A > 0): ratios 1.0 and 1.5 -> 1.5 is clipped to 1.2. Row 1 (A < 0): ratio 0.5 -> clipped to 0.8.
    expected = (-(1.0 + 1.2) * a / 2 + 0.8 * a) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logps)
    # Only the unclipped token carries gradient: d(-rho A)/dlogp = -rho A, / 2 tokens / 2 sequences.
    torch.testing.assert_close(grad, torch.tensor([[-a / 4, 0.0], [0.0, 0.0]]))
    assert m["clip_fraction"].item() == pytest.approx(2 / 3)


def test_grpo_asymmetric_clip_and_k3_kl():
    logps = torch.log(torch.tensor([[1.5], [1.0]]))
    old, mask = torch.zeros(2, 1), torch.ones(2, 1)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    loss, _ = grpo_loss(logps, old, mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), epsilon_high=0.28)
    assert loss.item() == pytest.approx((-1.28 * a + a) / 2, rel=1e-12)
    ref = torch.log(torch.tensor([[0.5], [2.0]]))
    loss_kl, m = grpo_loss(logps, logps, mask, torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), ref_logps=ref,
                           kl_coef=0.1)
    d = ref - logps  # k3 = e^d - d - 1
    k3 = (d.exp() - d - 1).mean()
    assert loss_kl.item() == pytest.approx(0.1 * k3.item(), rel=1e-12)  # equal rewards: A = 0
    assert m["kl"].item() == pytest.approx(k3.item(), rel=1e-12)


def test_dr_grpo_hand_computed():
    old = torch.zeros(2, 2)
    logps = torch.log(torch.tensor([[1.0, 1.5], [0.5, 1.0]])).requires_grad_()
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = dr_grpo_loss(logps, old, mask, torch.tensor([1.0, 0.0]), torch.tensor([3, 3]), max_completion_length=4)
    # A = (+0.5, -0.5), no std. Token losses: row 0: -0.5 * 1.0, -0.5 * 1.2 (clipped); row 1: +0.5 * 0.8.
    assert loss.item() == pytest.approx((-0.5 - 0.6 + 0.4) / (2 * 4), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, torch.tensor([[-0.5 / 8, 0.0], [0.0, 0.0]]))
    # Default constant: T.
    loss_t, _ = dr_grpo_loss(logps, old, mask, torch.tensor([1.0, 0.0]), torch.tensor([3, 3]))
    assert loss_t.item() == pytest.approx((-0.5 - 0.6 + 0.4) / (2 * 2), rel=1e-12)


def test_on_policy_gradient_is_centred_reward_reinforce():
    """With old_logps = logps.detach(), R_theta = 0 and w_i = R_i - mean R (GUIDE, section 1)."""
    logps, _, mask, rewards, ids = random_batch(6, sizes=(4, 4, 4))
    loss, m = gvpo_loss(logps, logps.detach(), mask, rewards, ids, beta=0.1)
    (grad,) = torch.autograd.grad(loss, logps)
    centred = torch.stack([rewards[i] - rewards[ids == ids[i]].mean() for i in range(len(ids))])
    torch.testing.assert_close(grad, (-0.1 / 3 * centred / 3)[:, None] * mask)
    assert m["implicit_reward_mean"].item() == 0


def test_all_singletons_give_a_connected_zero():
    logps = torch.randn(3, 4, requires_grad=True)
    loss, m = gvpo_loss(logps, logps.detach(), torch.ones(3, 4), torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logps.grad, torch.zeros(3, 4))
    assert m["groups_used"].item() == 0 and m["groups_skipped"].item() == 3
    assert all(torch.isfinite(v) for v in m.values())


def test_num_groups_makes_micro_batches_add_up():
    logps, old, mask, rewards, ids = random_batch(7, sizes=(3, 4, 2, 5))
    full, _ = gvpo_loss(logps, old, mask, rewards, ids)
    first = torch.isin(ids, ids.unique()[:2])
    parts = [gvpo_loss(logps[s], old[s], mask[s], rewards[s], ids[s], num_groups=4)[0] for s in (first, ~first)]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-12)


def test_padding_with_minus_inf_is_ignored():
    logps, old, mask, rewards, ids = random_batch(8)
    loss, _ = gvpo_loss(logps, old, mask, rewards, ids)
    padded = torch.where(mask.bool(), logps.detach(), torch.tensor(-math.inf))
    loss2, _ = gvpo_loss(padded, old, mask, rewards, ids)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)


def test_metrics_values():
    logps = torch.zeros(4, 1)
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0])
    _, m = gvpo_loss(logps, logps, torch.ones(4, 1), rewards, torch.tensor([0, 0, 1, 1]), beta=0.1)
    # R_theta = 0, centred rewards (0, 0, -1, 1): MSE = 2/4, |w| mean = 2/4, one of two groups has equal rewards.
    assert m["implicit_reward_mse"].item() == pytest.approx(0.5)
    assert m["weight_abs_mean"].item() == pytest.approx(0.5)
    assert m["frac_equal_reward_groups"].item() == pytest.approx(0.5)
    # Equal rewards that do not centre exactly to 0 in floating point still count as equal.
    _, m = gvpo_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.ones(3, 1), torch.full((3,), 0.1), torch.zeros(3).long())
    assert m["frac_equal_reward_groups"].item() == 1.0


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(old_logps=torch.zeros(4, 5)), "old_logps"),
        (dict(mask=torch.ones(4)), "mask"),
        (dict(rewards=torch.zeros(3)), "rewards"),
        (dict(group_ids=torch.zeros(4, 1).long()), "group_ids"),
        (dict(group_ids=torch.zeros(4)), "group_ids"),
        (dict(rewards=torch.tensor([0.0, math.nan, 1.0, 1.0])), "rewards.*index 1"),
        (dict(logps=torch.tensor([[0.0, -math.inf, 0, 0]] * 4)), "logps"),
        (dict(beta=0.0), "beta"),
        (dict(beta=-1.0), "beta"),
        (dict(logps=torch.zeros(0, 4), old_logps=torch.zeros(0, 4), mask=torch.zeros(0, 4), rewards=torch.zeros(0),
              group_ids=torch.zeros(0).long()), "empty"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    args = dict(logps=torch.zeros(4, 4), old_logps=torch.zeros(4, 4), mask=torch.ones(4, 4), rewards=torch.zeros(4),
                group_ids=torch.tensor([0, 0, 1, 1]), beta=0.1)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        gvpo_loss(**args)


def test_baseline_bad_input():
    args = (torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(*args, kl_coef=0.1)
    with pytest.raises(ValueError, match="epsilon"):
        dr_grpo_loss(*args, epsilon=0.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_float32_matches_float64(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    logps, old, mask, rewards, ids = random_batch(9)
    ref, _ = gvpo_loss(logps, old, mask, rewards, ids)
    args = [x.detach().to(device=device, dtype=torch.float32) if x.is_floating_point() else x.to(device)
            for x in (logps, old, mask, rewards, ids)]
    loss32, _ = gvpo_loss(*args)
    assert loss32.dtype == torch.float32 and loss32.device.type == device
    assert loss32.item() == pytest.approx(ref.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# LUFFY's regularized importance sampling for demonstrations (off_policy_mask)

def _luffy_case():
    probs = torch.tensor([[0.5, 0.2], [0.4, 0.9], [0.3, 0.6]], dtype=torch.float64)
    logps = probs.log().requires_grad_(True)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    rewards = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    group_ids = torch.zeros(3, dtype=torch.long)
    off = torch.tensor([True, False, False])
    return logps, mask, rewards, group_ids, off


def test_grpo_luffy_demonstration_tokens_by_hand():
    """Row 0 is a demonstration: its tokens use f(p) = p / (p + 0.1) (behaviour prob 1), the others ratio 1."""
    logps, mask, rewards, group_ids, off = _luffy_case()
    loss, m = grpo_loss(logps, logps.detach(), mask, rewards, group_ids, off_policy_mask=off)
    s = (1 / 3) ** 0.5 + 1e-4  # Bessel std of [1, 0, 0], plus GRPO's 1e-4
    a0, a1 = (2 / 3) / s, -(1 / 3) / s
    # per-sequence means: -a0 * (0.5/0.6 + 0.2/0.3) / 2, -a1, -a1; then the mean over 3 sequences
    expected = (-a0 * (0.5 / 0.6 + 0.2 / 0.3) / 2 - a1 - a1) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # d/dlog p of -a0 f(p) / 2 / 3 = -a0 * gamma p / (p + gamma)^2 / 6
    assert logps.grad[0, 0].item() == pytest.approx(-a0 * 0.1 * 0.5 / 0.6 ** 2 / 6, rel=1e-10)
    assert logps.grad[0, 1].item() == pytest.approx(-a0 * 0.1 * 0.2 / 0.3 ** 2 / 6, rel=1e-10)
    assert logps.grad[1, 0].item() == pytest.approx(-a1 / 2 / 3, rel=1e-10)  # on-policy: ratio 1, as GRPO
    assert logps.grad[2, 1].item() == 0.0


def test_dr_grpo_luffy_by_hand_and_naive_is_plain_dr_grpo():
    logps, mask, rewards, group_ids, off = _luffy_case()
    loss, _ = dr_grpo_loss(logps, logps.detach(), mask, rewards, group_ids, off_policy_mask=off)
    # A = [2/3, -1/3, -1/3] (no std); token losses summed, / (B * T) = 6
    expected = (-(2 / 3) * (0.5 / 0.6 + 0.2 / 0.3) + (1 / 3) * 2 + (1 / 3) * 1) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert logps.grad[0, 1].item() == pytest.approx(-(2 / 3) * 0.1 * 0.2 / 0.3 ** 2 / 6, rel=1e-10)
    # The naive way is no mask at all; a mask of all False is the same loss.
    naive, _ = dr_grpo_loss(logps, logps.detach(), mask, rewards, group_ids)
    none_off, _ = dr_grpo_loss(logps, logps.detach(), mask, rewards, group_ids, off_policy_mask=torch.zeros(3, dtype=torch.bool))
    # ratio 1 everywhere: (-(2/3) * 2 tokens + (1/3) * 2 + (1/3) * 1) / 6
    assert naive.item() == none_off.item() and naive.item() == pytest.approx(-1 / 18, abs=1e-12)


def test_luffy_ignores_old_logps_of_demonstrations_and_never_clips_them():
    logps, mask, rewards, group_ids, off = _luffy_case()
    old = logps.detach().clone()
    far = old.clone()
    far[0] = far[0] - 5.0  # a ratio of e^5 would be clipped for a sampled response
    a, ma = grpo_loss(logps, old, mask, rewards, group_ids, off_policy_mask=off)
    b, mb = grpo_loss(logps, far, mask, rewards, group_ids, off_policy_mask=off)
    assert a.item() == b.item() and mb["clip_fraction"].item() == 0.0
    c, mc = grpo_loss(logps, far, mask, rewards, group_ids)  # without the mask the same row is clipped
    assert mc["clip_fraction"].item() > 0 and c.item() != a.item()
    # gamma changes the shaping (and must be > 0); a bad mask is named
    d, _ = grpo_loss(logps, old, mask, rewards, group_ids, off_policy_mask=off, policy_shaping_gamma=0.5)
    assert d.item() != a.item()
    with pytest.raises(ValueError, match="policy_shaping_gamma"):
        grpo_loss(logps, old, mask, rewards, group_ids, off_policy_mask=off, policy_shaping_gamma=0.0)
    with pytest.raises(ValueError, match="off_policy_mask"):
        grpo_loss(logps, old, mask, rewards, group_ids, off_policy_mask=torch.tensor([1, 0, 0]))


def test_input_checks_read_no_values_off_the_cpu(monkeypatch):
    """On an accelerator a check of values (finite rewards / log-probs) is a device sync per micro-batch: there
    only shapes and dtypes are checked, unless GVPO_CHECK_VALUES=1. Meta tensors stand in for a device: reading a
    value from one raises, so a check that passes read none; a wrong shape is still named."""
    import gvpo.losses as losses

    def meta(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device="meta")

    args = (meta(4, 3), meta(4, 3), meta(4, 3, dtype=torch.long), meta(4), meta(4, dtype=torch.long))
    losses._check_inputs(*args, ref_logps=meta(4, 3))
    with pytest.raises(ValueError, match="old_logps: expected shape"):
        losses._check_inputs(args[0], meta(4, 2), *args[2:])
    monkeypatch.setattr(losses, "CHECK_VALUES_ON_DEVICE", True)  # the debug switch reads them everywhere
    with pytest.raises((RuntimeError, NotImplementedError)):
        losses._check_inputs(*args)

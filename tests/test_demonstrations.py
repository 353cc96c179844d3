"""Demonstrations inside GVPO groups: where they go, what they count for, and that d = 0 changes nothing."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import gvpo.trainer as trainer_module
from gvpo.config import load_config
from gvpo.losses import gvpo_loss, gvpo_weights, sequence_logps
from gvpo.modeling import token_logps
from gvpo.trainer import setup, train, train_step

K = 4


def demo_of(a, b):
    return f"{a}+{b}={a + b}"


# Each prompt has its own demonstration; 'sevens' scores any completion by its share of '7'.
ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "solution": demo_of(a, b)} for a in range(10, 30)
        for b in range(10, 20)]


def exact(prompts, completions, solution, **kwargs):
    """1 for a completion equal to the row's demonstration, else 0: tells demos from samples by reward."""
    return [float(c == s) for c, s in zip(completions, solution)]


def sevens(prompts, completions, **kwargs):
    return [c.count("7") / max(len(c), 1) for c in completions]


def config_for(tmp_path, model_dir, name="run", **overrides):
    base = {
        "model_name_or_path": model_dir, "output_dir": str(tmp_path / name), "max_steps": 3,
        "prompts_per_step": 6, "num_generations": K, "max_completion_length": 10, "learning_rate": 1e-2,
        "eval_steps": 0, "save_steps": 0, "progress_bar": False, "seed": 0,
    }
    base.update(overrides)
    return load_config(None, base)


def capture_batches(monkeypatch):
    """Record every batch the trainer hands to the update (then update as usual)."""
    seen = []
    real = trainer_module.update

    def recording(run, batch):
        seen.append((run, batch))
        return real(run, batch)

    monkeypatch.setattr(trainer_module, "update", recording)
    return seen


def one_step(tmp_path, model_dir, monkeypatch, rows, reward=exact, **overrides):
    seen = capture_batches(monkeypatch)
    run = setup(config_for(tmp_path, model_dir, **overrides), [reward], rows, rows[:4])
    metrics = train_step(run, 1)
    return run, seen[0][1], metrics


def completion_ids(batch, row):
    T = batch.completion_mask.shape[1]
    return batch.input_ids[row, -T:][batch.completion_mask[row].bool()].tolist()


def decoded(run, batch, row):
    return run.tokenizer.decode(completion_ids(batch, row), skip_special_tokens=True)


def prompt_of(run, batch, row):
    T = batch.completion_mask.shape[1]
    ids = batch.input_ids[row, :-T][batch.attention_mask[row, :-T].bool()]
    return run.tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def test_a_demonstration_joins_exactly_its_prompts_group_and_counts_in_its_statistics(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    run, batch, metrics = one_step(tmp_path, tiny_model_dir, monkeypatch, ROWS, demonstration_column="solution")
    demo_rows = batch.is_demonstration.nonzero().flatten().tolist()
    assert len(demo_rows) == 6 and metrics["demonstrations"] == 6 and metrics["demonstration_reward_mean"] == 1.0
    by_prompt = {r["prompt"]: r for r in ROWS}
    for g in batch.group_ids.unique().tolist():
        rows = (batch.group_ids == g).nonzero().flatten().tolist()
        assert len(rows) == K  # k - d fresh + d demonstrations
        demos = [i for i in rows if batch.is_demonstration[i]]
        assert len(demos) == 1
        prompt = prompt_of(run, batch, demos[0])
        assert all(prompt_of(run, batch, i) == prompt for i in rows)  # same prompt in the whole group
        assert decoded(run, batch, demos[0]) == by_prompt[prompt]["solution"]  # its own prompt's demonstration
        ids = completion_ids(batch, demos[0])
        assert ids[-1] == run.tokenizer.eos_token_id  # tokenized as a generated completion: EOS appended
        assert batch.rewards[demos[0]] == 1.0  # scored by the same reward function
        # Its reward enters the group mean: with the k - 1 samples scoring 0 (the random model never writes
        # the demonstration), the samples' GVPO weight is -1/k and the demonstration's 1 - 1/k.
        zeros = torch.zeros(len(batch))
        w = gvpo_weights(zeros, zeros, batch.rewards, batch.group_ids, beta=0.1)
        assert [float(w[i]) for i in rows if i not in demos] == pytest.approx([-1 / K] * (K - 1))
        assert float(w[demos[0]]) == pytest.approx(1 - 1 / K)
    assert torch.isnan(batch.behavior_logps[batch.is_demonstration][batch.completion_mask[batch.is_demonstration].bool()]).all()
    assert not batch.is_replayed.any()


def test_groups_of_mixed_size_stay_correct(tmp_path, tiny_model_dir, monkeypatch):
    """d = 2 with rows holding 0, 1, 2 or 3 demonstrations: each group has min(n, d) of them and k in all;
    an unscorable demonstration leaves its group (k - 1 remain)."""
    rows = [dict(r) for r in ROWS[:6]]
    rows[0]["solution"] = []
    rows[1]["solution"] = [rows[1]["solution"]]
    rows[2]["solution"] = [rows[2]["solution"], "1+1=2"]
    rows[3]["solution"] = [rows[3]["solution"], "1+1=2", "2+2=4"]
    rows[4]["solution"] = [rows[4]["solution"], "bad"]  # scored None below: leaves its group
    rows[5]["solution"] = [rows[5]["solution"]]

    def exact_or_none(prompts, completions, solution, **kwargs):
        return [None if c == "bad" else float(c in s) for c, s in zip(completions, solution)]

    run, batch, _ = one_step(tmp_path, tiny_model_dir, monkeypatch, rows, reward=exact_or_none,
                             demonstration_column="solution", demonstrations_per_group=2)
    sizes, demos = {}, {}
    for g in batch.group_ids.unique().tolist():
        in_g = batch.group_ids == g
        prompt = prompt_of(run, batch, int(in_g.nonzero()[0]))
        sizes[prompt], demos[prompt] = int(in_g.sum()), int((in_g & batch.is_demonstration).sum())
    expected_demos = [0, 1, 2, 2, 1, 1]
    expected_sizes = [K, K, K, K, K - 1, K]
    assert [demos[r["prompt"]] for r in rows] == expected_demos
    assert [sizes[r["prompt"]] for r in rows] == expected_sizes
    # The loss runs on the uneven groups (Cor. 3.5): every group has >= 2 responses.
    logps = torch.zeros(batch.completion_mask.shape)
    _, m = gvpo_loss(logps, logps, batch.completion_mask, batch.rewards, batch.group_ids)
    assert m["groups_used"] == 6


def test_demonstrations_with_replay_keep_k_and_are_never_stored(tmp_path, tiny_model_dir, monkeypatch):
    rows = ROWS[:6]  # every step draws the same 6 prompts, so history exists from step 2
    seen = capture_batches(monkeypatch)
    cfg = config_for(tmp_path, tiny_model_dir, demonstration_column="solution", num_historical=1, max_steps=2)
    run = setup(cfg, [exact], rows, rows[:4])
    train_step(run, 1)
    train_step(run, 2)
    batch = seen[1][1]
    for g in batch.group_ids.unique().tolist():
        in_g = batch.group_ids == g
        assert int(in_g.sum()) == K and int((in_g & batch.is_demonstration).sum()) == 1
        assert int((in_g & batch.is_replayed).sum()) == 1
    stored = [r for responses in run.replay.entries.values() for r in responses]
    assert stored and all(not any(math.isnan(x) for x in r.behavior_logps) for r in stored)
    assert all(r.reward == 0.0 for r in stored)  # only samples are stored, never a demonstration (reward 1)


def test_gvpo_loss_on_a_group_with_a_demonstration_equals_a_hand_recomputation(tmp_path, tiny_model_dir,
                                                                               monkeypatch):
    run, batch, _ = one_step(tmp_path, tiny_model_dir, monkeypatch, ROWS, reward=sevens,
                             demonstration_column="solution")
    model = run.policy
    with torch.no_grad():
        logps = token_logps(model, batch.input_ids, batch.attention_mask, batch.position_ids,
                            batch.completion_mask.shape[1])
    seq = sequence_logps(logps, batch.completion_mask)
    # The demonstration's sequence log-prob is teacher forcing of prompt + demonstration without padding.
    d = int(batch.is_demonstration.nonzero()[0])
    prompt = prompt_of(run, batch, d)
    p_ids = run.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = completion_ids(batch, d)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].log_softmax(-1)
    by_hand = sum(float(logits[len(p_ids) - 1 + t, c]) for t, c in enumerate(c_ids))
    assert float(seq[d]) == pytest.approx(by_hand, abs=1e-4)
    # The loss with some pi_theta' != pi_theta, recomputed from its definition with plain Python floats.
    beta = 0.3
    old = logps - 0.05 * torch.arange(logps.numel()).reshape(logps.shape).remainder(3)
    loss, _ = gvpo_loss(logps, old, batch.completion_mask, batch.rewards, batch.group_ids, beta=beta)
    o = sequence_logps(old, batch.completion_mask).tolist()
    s, r, gid = seq.tolist(), batch.rewards.tolist(), batch.group_ids.tolist()
    total = 0.0
    groups = sorted(set(gid))
    for g in groups:
        idx = [i for i in range(len(gid)) if gid[i] == g]
        rt = [beta * (s[i] - o[i]) for i in idx]
        rr = [r[i] for i in idx]
        mrt, mrr = sum(rt) / len(idx), sum(rr) / len(idx)
        total += 0.5 * sum(((a - mrt) - (b - mrr)) ** 2 for a, b in zip(rt, rr)) / (len(idx) - 1)
    assert float(loss) == pytest.approx(total / len(groups), rel=1e-5)


def _weights(path):
    return load_file(str(path / "checkpoints" / "step-000003" / "model.safetensors"))


def _log(path):
    return [{k: v for k, v in json.loads(line).items() if k not in ("step_seconds", "generation_seconds", "update_seconds")}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_d_zero_is_bit_identical_to_a_run_without_demonstrations(tmp_path, tiny_model_dir):
    runs = {}
    for name, extra in (("plain", {}), ("zero", {"demonstration_column": "solution", "demonstrations_per_group": 0}),
                        ("one", {"demonstration_column": "solution"})):
        train(config_for(tmp_path, tiny_model_dir, name=name, **extra), [sevens], ROWS, ROWS[:8])
        runs[name] = (_weights(tmp_path / name), _log(tmp_path / name))
    for k, v in runs["plain"][0].items():
        assert torch.equal(runs["zero"][0][k], v), k
    assert runs["zero"][1] == runs["plain"][1]
    # ... while d = 1 does change the run, so the comparison can fail.
    assert any(not torch.equal(runs["one"][0][k], v) for k, v in runs["plain"][0].items())


@pytest.mark.parametrize("algorithm,demonstration_loss", [("gvpo", "luffy"), ("grpo", "luffy"), ("grpo", "naive"),
                                                          ("dr_grpo", "luffy")])
def test_demonstrations_train_with_replay_and_several_updates(tmp_path, tiny_model_dir, algorithm, demonstration_loss):
    """Every loss trains on batches with demonstrations (NaN behaviour log-probs) next to replayed responses
    (whose behaviour log-probs the baselines do use), with mini-batches: nothing non-finite reaches an update."""
    cfg = config_for(tmp_path, tiny_model_dir, algorithm=algorithm, demonstration_loss=demonstration_loss,
                     demonstration_column="solution", num_historical=1, num_mini_batches=2, max_steps=3)
    summary = train(cfg, [exact], ROWS[:6], ROWS[:4])
    log = [r for r in _log(tmp_path / "run") if "loss" in r]
    assert summary["skipped_updates"] == 0 and len(log) == 3
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in log)
    assert sum(r.get("replayed", 0) for r in log) > 0


def _demo_logp(model_dir, weights, rows):
    """Mean log-prob of each row's demonstration (EOS included) given its prompt, by teacher forcing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_state_dict(weights, strict=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    total = 0.0
    with torch.no_grad():
        for r in rows:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(r["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logits = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
            total += sum(float(logits[len(p) - 1 + t, x]) for t, x in enumerate(c))
    return total / len(rows)


def test_demonstrations_give_a_signal_where_samples_give_none(tmp_path, tiny_model_dir):
    """Exact match with the demonstration: the random model never scores, so on-policy GVPO has no signal and
    leaves the weights unchanged; with demonstrations the demonstrations become far more likely."""
    rows = ROWS[:8]
    logp = {}
    for name, extra in (("none", {}), ("demos", {"demonstration_column": "solution"})):
        train(config_for(tmp_path, tiny_model_dir, name=name, prompts_per_step=8, **extra), [exact], rows, rows)
        logp[name] = _demo_logp(tiny_model_dir, _weights(tmp_path / name), rows)
    start = _demo_logp(tiny_model_dir, load_file(f"{tiny_model_dir}/model.safetensors"), rows)
    assert logp["none"] == pytest.approx(start, abs=1e-6)
    assert logp["demos"] > start + 3.0, (start, logp)


def test_bad_demonstration_settings_say_how_to_fix(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="num_historical \\+ demonstrations_per_group"):
        config_for(tmp_path, tiny_model_dir, demonstration_column="solution", demonstrations_per_group=2,
                   num_historical=2)
    with pytest.raises(ValueError, match="demonstrations_per_group"):
        config_for(tmp_path, tiny_model_dir, demonstrations_per_group=-1)
    with pytest.raises(ValueError, match="demonstration_loss"):
        config_for(tmp_path, tiny_model_dir, demonstration_loss="mixed")
    with pytest.raises(ValueError, match="demonstration_column='worked'.*no such column"):
        train(config_for(tmp_path, tiny_model_dir, demonstration_column="worked"), [exact], ROWS, ROWS[:4])
    rows = [{**r, "solution": 3} for r in ROWS]
    with pytest.raises(ValueError, match="expected a completion string or a list"):
        train(config_for(tmp_path, tiny_model_dir, demonstration_column="solution"), [exact], rows, rows[:4])


@pytest.mark.parametrize("demonstration_loss", ["luffy", "naive"])
def test_baselines_get_the_demonstration_mask_only_the_luffy_way(tmp_path, tiny_model_dir, monkeypatch,
                                                                demonstration_loss):
    import gvpo.losses
    import gvpo.update

    calls = []
    real = gvpo.losses.grpo_loss

    def recording(*args, **kwargs):
        calls.append(kwargs.get("off_policy_mask"))
        return real(*args, **kwargs)

    monkeypatch.setitem(gvpo.losses.LOSSES, "grpo", recording)
    seen = capture_batches(monkeypatch)
    cfg = config_for(tmp_path, tiny_model_dir, algorithm="grpo", demonstration_loss=demonstration_loss,
                     demonstration_column="solution", max_steps=1)
    train(cfg, [exact], ROWS, ROWS[:4])
    batch = seen[0][1]
    assert len(calls) == 1 and int(batch.is_demonstration.sum()) == 6
    if demonstration_loss == "luffy":
        assert torch.equal(calls[0], batch.is_demonstration)
    else:
        assert calls[0] is None  # the naive way: demonstrations as if sampled, the usual clipped ratio


def test_demonstrations_refuse_modes_that_would_need_their_behaviour_logps(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="old_policy.*no behaviour log-probs"):
        config_for(tmp_path, tiny_model_dir, demonstration_column="solution", old_policy="behaviour")


@pytest.mark.parametrize("algorithm,loss", [("grpo", "naive"), ("grpo", "luffy"), ("gvpo", "luffy")])
def test_demonstrations_in_lagged_batches_stay_finite(tmp_path, tiny_model_dir, algorithm, loss):
    """Under simulated_policy_lag the batch is stale: the baselines' behaviour ratio and the staleness KL must
    leave demonstrations (NaN behaviour log-probs) out."""
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=3, algorithm=algorithm, demonstration_loss=loss,
                     demonstration_column="solution", simulated_policy_lag=1)
    summary = train(cfg, [exact], ROWS, ROWS[:4])
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in log if "loss" in r]
    assert summary["skipped_updates"] == 0 and sum(r["demonstrations"] for r in trained) > 0
    assert max(r["policy_lag_max"] for r in trained) == 1
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl_behaviour_current"]) for r in trained)

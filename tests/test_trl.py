"""GVPOTrainer (gvpo.integrations.trl) against TRL 1.16 on a tiny random Qwen2, on CPU.

The reference recomputes everything without TRL's helpers: log-probs from a plain forward, rewards from the
decoded completions, groups from the prompt text; the loss TRL logs must equal gvpo_loss on those.
"""

import importlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (a TRL dependency)
from tokenizers import Tokenizer, decoders, models  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from gvpo.integrations.trl import GVPOConfig, GVPOTrainer, check_whole_groups  # noqa: E402
from gvpo.losses import gvpo_loss  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 :+="
K = 4  # num_generations


def first_half_letters(completions, **kwargs):
    """Reward with spread on a random model: how many of the completion's characters are in a..m."""
    return [float(sum(c in "abcdefghijklm" for c in text)) for text in completions]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved 1-layer random Qwen2 and a char-level tokenizer (TRL wants a local path and a processing_class)."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    return str(path), tokenizer


def prompts_dataset(n=16):
    # Same-length prompts: no prompt padding, so the reference forward needs no position-id care.
    return Dataset.from_dict({"prompt": [f"{CHARS[i]}{CHARS[i + 1]}:" for i in range(n)]})


def make_config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", seed=0,
                  per_device_train_batch_size=2 * K, gradient_accumulation_steps=2, num_generations=K,
                  max_completion_length=8, max_steps=3, logging_steps=1, learning_rate=1e-3, save_strategy="no",
                  dataloader_num_workers=0)
    kwargs.update(overrides)
    return GVPOConfig(**kwargs)


def reference(model, inputs, tokenizer, beta, old_logps=None):
    """gvpo_loss from first principles on a captured micro-batch; returns (loss, logps)."""
    prompt_ids, completion_ids, mask = inputs["prompt_ids"], inputs["completion_ids"], inputs["completion_mask"]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([inputs["prompt_mask"], mask], dim=1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, prompt_ids.size(1) - 1 : -1]  # (B, T, V)
    logps = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    texts = tokenizer.batch_decode(completion_ids.masked_fill(mask == 0, 0), skip_special_tokens=True)
    rewards = torch.tensor(first_half_letters(texts))  # raw, uncentred
    prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    group_ids = torch.tensor([sorted(set(prompts)).index(p) for p in prompts])
    old = logps if old_logps is None else old_logps
    loss, _ = gvpo_loss(logps, old, mask, rewards, group_ids, beta=beta)
    return loss, logps


def recording_trainer(tokenizer, beta):
    """A GVPOTrainer that recomputes the reference before every micro-batch's loss (same parameters), with
    pi_theta' = the log-probs each row had when it was generated (recorded per row, before any shuffle)."""

    def row_keys(inputs):
        return [c.numpy().tobytes() + p.numpy().tobytes()
                for c, p in zip(inputs["completion_ids"], inputs["prompt_ids"])]

    class Recorder(GVPOTrainer):
        records = []  # (reference loss, loss returned to TRL)
        old = {}  # row key -> log-probs (T,) of the policy that generated the row
        generations = 0

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if self.model.training:
                type(self).generations += 1
                with torch.no_grad():
                    _, logps = reference(self.model, output, tokenizer, beta)
                for key, row in zip(row_keys(output), logps):
                    self.old.setdefault(key, row)
            return output

        def _compute_loss(self, model, inputs):
            old = torch.stack([self.old[key] for key in row_keys(inputs)])
            with torch.no_grad():
                expected, _ = reference(model, inputs, tokenizer, beta, old)
            loss = super()._compute_loss(model, inputs)
            self.records.append((expected.item(), loss.item()))
            return loss

    return Recorder


def test_logged_loss_is_gvpo_loss_and_training_moves_params(tiny, tmp_path):
    path, tokenizer = tiny
    args = make_config(tmp_path, beta=0.1)
    cls = recording_trainer(tokenizer, beta=0.1)
    trainer = cls(model=path, reward_funcs=first_half_letters, args=args, train_dataset=prompts_dataset(),
                  processing_class=tokenizer)
    # GVPO's beta never reaches TRL's KL machinery: no reference model, KL coefficient 0.
    assert trainer.ref_model is None and trainer.beta == 0.0
    assert trainer.gvpo_beta == 0.1 and trainer.args.beta == 0.1
    assert args.steps_per_generation == 2  # TRL's default: one generation per optimizer step, split in 2
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and len(cls.records) == 6  # 3 steps x 2 micro-batches
    for step, h in enumerate(logged):
        micro = cls.records[2 * step : 2 * step + 2]
        # one process, 2 groups per micro-batch: the step's loss is the mean of the two micro-batch means
        assert h["loss"] == pytest.approx(sum(e for e, _ in micro) / 2, rel=1e-5, abs=1e-6)
        for expected, returned in micro:
            assert returned == pytest.approx(expected / 2, rel=1e-5, abs=1e-6)  # divided by 2 accumulation steps
        assert {"gvpo/implicit_reward_mse", "gvpo/weight_abs_mean", "gvpo/frac_equal_reward_groups"} <= h.keys()
        # On-policy single update: R_theta = 0, so per group the MSE is the mean squared centred reward and the
        # loss 1/(K - 1) * 1/2 * its sum: mse = loss * 2 (K - 1) / K. A pi_theta' other than the generating
        # policy (R_theta != 0) breaks the identity.
        assert h["gvpo/implicit_reward_mse"] == pytest.approx(h["loss"] * 2 * (K - 1) / K, rel=1e-4, abs=1e-7)
    assert any(h["loss"] > 0 for h in logged), "rewards had no spread in any group: the test checks nothing"
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter changed after 3 GVPO steps"


@pytest.mark.parametrize("reuse", [{"num_iterations": 2}, {"steps_per_generation": 2}],
                         ids=["second-iteration", "second-micro-batch"])
def test_reused_batches_are_scored_against_the_generating_policy(tiny, tmp_path, reuse):
    """One generation used by 2 optimizer steps, as a second iteration over the batch or as its second
    micro-batch (TRL cuts the generation batch in 2; the group shuffle keeps groups whole, else
    check_whole_groups raises): the later step is scored against pi_theta' = the policy that generated it."""
    path, tokenizer = tiny
    args = make_config(tmp_path, beta=1.0, gradient_accumulation_steps=1, max_steps=2, learning_rate=1e-2, **reuse)
    cls = recording_trainer(tokenizer, beta=1.0)
    trainer = cls(model=path, reward_funcs=first_half_letters, args=args, train_dataset=prompts_dataset(),
                  processing_class=tokenizer)
    trainer.train()
    assert cls.generations == 1 and len(cls.records) == 2
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for loss, (expected, returned) in zip(logged, cls.records):
        assert returned == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if "num_iterations" in reuse:  # the same rows twice: R_theta = 0 at step 1, not at step 2
        implicit_mse = [h["gvpo/implicit_reward_mse"] for h in trainer.state.log_history if "loss" in h]
        assert implicit_mse[1] != pytest.approx(implicit_mse[0], abs=1e-6), "beta * (s - o) had no effect"


def test_shuffle_groups_moves_whole_groups():
    from gvpo.integrations.trl import shuffle_groups

    torch.manual_seed(0)
    batch = {"ids": torch.arange(12), "text": [f"r{i}" for i in range(12)], "scalar": torch.tensor(3.0), "none": None}
    orders = set()
    for _ in range(20):
        out = shuffle_groups(batch, 3)
        blocks = out["ids"].view(4, 3)
        assert (blocks - blocks[:, :1] == torch.arange(3)).all() and (blocks[:, 0] % 3 == 0).all()
        assert out["text"] == [f"r{i}" for i in out["ids"].tolist()]
        assert out["scalar"] is batch["scalar"] and out["none"] is None
        orders.add(tuple(blocks[:, 0].tolist()))
    assert len(orders) > 1, "the groups were never reordered"


def test_partial_groups_are_rejected_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match=r"per_device_train_batch_size=2 is not a multiple of num_generations=4"):
        make_config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"expected num_generations=4 each"):
        check_whole_groups(torch.tensor([0, 0, 0, 0, 1, 1]), 4)
    check_whole_groups(torch.tensor([3, 7, 3, 7, 7, 3, 3, 7]), 4)  # any order is fine


def test_config_rejects_what_gvpo_is_not(tmp_path):
    with pytest.raises(ValueError, match="scale_rewards='none'"):
        make_config(tmp_path, scale_rewards="group")
    with pytest.raises(ValueError, match="beta > 0"):
        make_config(tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="entropy_coef"):
        make_config(tmp_path, entropy_coef=0.01)


def test_core_package_does_not_import_trl():
    code = "import sys, gvpo, gvpo.losses; assert 'trl' not in sys.modules, 'gvpo imported trl'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_trl_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` raise ImportError
    monkeypatch.delitem(sys.modules, "gvpo.integrations.trl")
    with pytest.raises(ImportError, match=r"pip install 'gvpo\[trl\]'"):
        importlib.import_module("gvpo.integrations.trl")

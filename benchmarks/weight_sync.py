"""Seconds per weight publish in async mode: Ray's object store vs a collective broadcast (gloo on CPU).

For each model, one set of rollout workers per mode (``--workers`` each), then ``--reps`` publishes alternating
between the modes. Each publish: the learner's weights change (full fine-tuning: every tensor is sent), the
learner publishes version v (``weight_sync.Publisher.publish``: object store = copy + ``ray.put``; collective =
copy + broadcast, returning once every worker received it), then every worker starts a task at version v
(``RolloutWorker.use_weights``: object store = fetch + load into the model; collective = load the received copy).

Reported per mode, medians: ``learner_s`` (the learner blocked in publish), ``workers_s`` (from then until
every worker holds v in its model) and ``total_s``. The first publish of each mode is left out (warm-up).

    PYTHONPATH=src .venv/bin/python benchmarks/weight_sync.py                 # embedded model and a 25M model
    PYTHONPATH=src .venv/bin/python benchmarks/weight_sync.py --models default --workers 2 --reps 10

The last line is JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def model_path(name: str, tmp: Path) -> tuple[str, str]:
    if name == "default":
        return "default", "embedded default model"
    path, params = importlib.import_module("async").build_25m(tmp / "qwen2-25m")
    return path, f"random Qwen2 {params / 1e6:.0f}M"


def bench_model(ray, path: str, workers: int, reps: int) -> dict:
    from gvpo.config import load_config
    from gvpo.modeling import load_model_and_tokenizer
    from gvpo.rollout_worker import RolloutWorker
    from gvpo.modeling import prepare_model
    from gvpo.weight_sync import COLLECTIVE, OBJECT_STORE, Publisher, actor_class, trainable_weights

    config = load_config(None, {"model_name_or_path": path, "rollout_workers": workers})
    policy = prepare_model(load_model_and_tokenizer(path, config.model.dtype, False)[0], config)
    sent = trainable_weights(policy)
    mb = sum(t.numel() * t.element_size() for t in sent.values()) / 2**20
    modes = {}
    for mode in (OBJECT_STORE, COLLECTIVE):
        cls = actor_class(ray, mode, RolloutWorker).options(num_cpus=1)
        actors = [cls.remote(config, [], []) for _ in range(workers)]
        modes[mode] = (actors, Publisher(ray, mode, actors, policy, {}))
    times = {m: [] for m in modes}
    for version in range(1, reps + 2):
        for mode, (actors, publisher) in modes.items():
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(1e-3)
            t0 = time.perf_counter()
            payload = publisher.publish(policy, version)
            t1 = time.perf_counter()
            assert ray.get([a.use_weights.remote(version, payload) for a in actors]) == [version] * workers
            t2 = time.perf_counter()
            if version > 1:
                times[mode].append((t1 - t0, t2 - t1, t2 - t0))
    for actors, _ in modes.values():
        for a in actors:
            ray.kill(a)
    out = {"tensors": len(sent), "megabytes": round(mb, 1)}
    for mode, ts in times.items():
        out[mode] = {k: statistics.median(t[i] for t in ts) for i, k in enumerate(("learner_s", "workers_s", "total_s"))}
    out["collective_vs_object_store_total"] = out[COLLECTIVE]["total_s"] / out[OBJECT_STORE]["total_s"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="default,25m")
    p.add_argument("--workers", type=int, default=1, help="rollout workers per mode")
    p.add_argument("--reps", type=int, default=8, help="publishes per mode (after one warm-up)")
    a = p.parse_args()
    import ray

    ray.init(address="local", num_cpus=2 * a.workers, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(x for x in sys.path if x)}})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            path, desc = model_path(name, Path(tmp))
            results[name] = {"desc": desc, **bench_model(ray, path, a.workers, a.reps)}
    ray.shutdown()
    print(f"\n{'model':<8} {'MB sent':>8} {'mode':<13} {'learner s':>10} {'workers s':>10} {'total s':>9}")
    for name, r in results.items():
        for mode in ("object_store", "collective"):
            m = r[mode]
            print(f"{name:<8} {r['megabytes']:>8.1f} {mode:<13} {m['learner_s']:>10.4f} {m['workers_s']:>10.4f} "
                  f"{m['total_s']:>9.4f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

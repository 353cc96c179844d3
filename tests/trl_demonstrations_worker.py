"""A rank of tests/test_trl_demonstrations.py's multi-process run (torchrun, gloo on CPU): GVPOTrainer with list
demonstrations; writes what this rank's reward function saw to OUT/seen<rank>.json."""

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from distributed_worker import record_group_at_exit
from test_trl_demonstrations import demonstration_run

if __name__ == "__main__":
    model_dir, out, per_device = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    record_group_at_exit(out)
    trainer, seen = demonstration_run(model_dir, AutoTokenizer.from_pretrained(model_dir), out, per_device)
    rank = trainer.accelerator.process_index
    (out / f"seen{rank}.json").write_text(json.dumps({"world": trainer.accelerator.num_processes, "seen": seen}))

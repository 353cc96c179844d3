"""`gvpo train | eval | compare`: the command-line entry points."""

from __future__ import annotations

import argparse
import json
import os
import sys

TRAIN_HELP = """\
Train a causal LM with GVPO (or GRPO / Dr. GRPO). With no arguments: the embedded tiny model on the
synthetic arithmetic task, on CPU, in about a minute (60 steps), written to runs/default.

Settings come from the defaults, then --config FILE (YAML, sections model/peft/data/rollout/algorithm/replay/
optimizer/training/eval/logging/checkpoint; every field is documented in gvpo/config_sections.py), then overrides:
`key=value`, `section.key=value` or `--key value`.

A new run stops if output_dir already holds one: choose another output_dir, continue it with --resume, or
add overwrite_output_dir=true to delete it first. --resume continues from the latest checkpoint; a finished
run is extended by raising max_steps.

examples:
  gvpo train
  gvpo train --config configs/math_qwen2.5_1.5b.yaml
  gvpo train algorithm=grpo output_dir=runs/grpo max_steps=100
  gvpo train --output_dir runs/default --resume max_steps=100
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and where to look, no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _overrides(tokens: list[str]) -> list[str]:
    """Accept `k=v`, `--k=v` and `--k v`."""
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--") and "=" not in tok:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise SystemExit(f"gvpo train: {tok} needs a value (write {tok} VALUE or {tok[2:]}=VALUE)")
            out.append(f"{tok[2:]}={tokens[i + 1]}")
            i += 2
        else:
            out.append(tok.lstrip("-"))
            i += 1
    return out


def cmd_train(argv: list[str]) -> int:
    from gvpo.config import load_config

    p = _Parser(prog="gvpo train", description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    args, rest = p.parse_known_args(argv)
    overrides = _overrides(rest)
    if args.resume:
        overrides.append("checkpoint.resume=true")
    try:
        config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"gvpo train: {e}", file=sys.stderr)
        return 2
    from gvpo.trainer import train

    summary = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch only rank 0 reports
        return 0
    print(json.dumps(summary, indent=2))
    if summary.get("initial_accuracy") is not None and summary.get("final_accuracy") is not None:
        print(f"held-out accuracy: {summary['initial_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
              f"in {summary['steps']} steps, {summary['wall_seconds']:.0f} s ({config.logging.output_dir})")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from gvpo.data import BENCHMARKS, TEMPLATES

    p = _Parser(prog="gvpo eval", description="Evaluate a model on the paper's math benchmarks; writes one "
                "<output_dir>/<benchmark>.json per benchmark and prints the table.")
    p.add_argument("--model", default="default",
                   help="local path, hub name, or a gvpo train output_dir (its latest checkpoint); default: the "
                   "embedded model")
    p.add_argument("--benchmarks", default="math500,aime24,amc23,minerva,olympiadbench",
                   help=f"comma-separated, of: {', '.join(BENCHMARKS)}")
    p.add_argument("--n", type=int, default=1, help="samples per problem (avg@n); 1 with temperature 0 = greedy")
    p.add_argument("--temperature", type=float, default=None, help="default: 0 for n = 1, else 0.6")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--template", default="qwen_math", help=f"one of {', '.join(TEMPLATES)}")
    p.add_argument("--engine", default="auto", help="auto (vllm on a GPU when installed, else fast), fast, hf or vllm")
    p.add_argument("--data_dir", default=None, help="default: $GVPO_DATA_DIR or ../shared/data")
    p.add_argument("--output_dir", default="runs/eval")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    names = _check_eval_args(p, a)
    import torch

    from gvpo.data import load_benchmark
    from gvpo.evaluation import evaluate, format_table

    for name in (b for b in a.benchmarks.split(",") if b):  # names and data checked before the model loads
        load_benchmark(name, data_dir=a.data_dir)
    from gvpo.modeling import load_model_and_tokenizer
    from gvpo.rollout import make_engine, resolve_engine

    torch.manual_seed(a.seed)
    a.engine = resolve_engine(a.engine)
    model_path = _model_of_run(a.model)
    model, tokenizer = load_model_and_tokenizer(model_path, a.dtype)
    if torch.cuda.is_available() and a.engine != "vllm":
        model = model.cuda()
    model.eval()
    engine = make_engine(a.engine, model, tokenizer)
    temperature = a.temperature if a.temperature is not None else (0.0 if a.n == 1 else 0.6)
    try:
        results = evaluate(model, tokenizer, engine, names, n=a.n, temperature=temperature, top_p=a.top_p,
                           max_new_tokens=a.max_new_tokens, limit=a.limit, template=a.template,
                           data_dir=a.data_dir, output_dir=a.output_dir, batch_size=a.batch_size, seed=a.seed,
                           progress=print)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    for name, r in results["benchmarks"].items():
        if r.get("prompts_over_max_length"):
            print(f"note: {r['prompts_over_max_length']} of {r['num_problems']} {name} prompts are longer than "
                  f"the tokenizer's model_max_length ({r['model_max_length']} tokens); the model still runs on "
                  f"them, but was not trained on prompts that long")
    print(format_table(results, label=model_path.rstrip("/").split("/")[-1]))
    return 0


def _check_eval_args(p: argparse.ArgumentParser, a) -> list[str]:
    """Everything that can be wrong with the flags, before the model loads; returns the benchmark names."""
    from gvpo.data import BENCHMARKS, TEMPLATES, resolve_data_dir

    names = [b for b in a.benchmarks.split(",") if b]
    unknown = [b for b in names if b.lower().replace("-", "_") not in (*BENCHMARKS, "minerva_math")]
    if unknown or not names:
        p.error(f"--benchmarks {a.benchmarks}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                f"choose from {', '.join(BENCHMARKS)}")
    if a.template not in TEMPLATES:
        p.error(f"--template {a.template}: choose one of {', '.join(TEMPLATES)}")
    for flag, value in (("--n", a.n), ("--limit", a.limit), ("--batch_size", a.batch_size),
                        ("--max_new_tokens", a.max_new_tokens)):
        if value is not None and value < 1:
            p.error(f"{flag} {value}: must be >= 1")
    if a.n > 1 and a.temperature == 0:
        p.error(f"--n {a.n} with --temperature 0: greedy decoding gives {a.n} identical samples; "
                f"use --temperature 0.6 (the default for --n > 1) or --n 1")
    try:
        resolve_data_dir(a.data_dir)
    except FileNotFoundError as e:
        p.error(str(e))
    return names


def _model_of_run(model: str) -> str:
    """A `gvpo train` output_dir stands for its latest checkpoint; anything else is passed on as is."""
    from gvpo.checkpoint import checkpoint_dir, latest_checkpoint

    if not checkpoint_dir(model).is_dir():
        return model
    path = latest_checkpoint(model)
    if path is None:
        raise SystemExit(f"gvpo eval: --model {model}: this run has no complete checkpoint yet")
    print(f"model: {path} (the latest checkpoint of {model})")
    return str(path)


def cmd_compare(argv: list[str]) -> int:
    p = _Parser(prog="gvpo compare", description="One plot and one table of several runs' metrics.")
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--output", default=None,
                   help="the plot's path; default: compare-<run names>.png in the runs' common parent folder")
    p.add_argument("--metric", default="eval_accuracy")
    a = p.parse_args(argv)
    from gvpo.compare import compare_runs

    print(compare_runs(a.runs, a.output, a.metric))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare}
DEBUG_ENV = "GVPO_DEBUG"


def _user_errors() -> tuple:
    """Errors a user can fix from the message alone (bad value, missing file, unreachable hub, failing reward):
    shown in one or two lines. Anything else is a bug and keeps its traceback."""
    from gvpo.rewards.calling import RewardError

    return ValueError, OSError, ImportError, RewardError


def _run(command: str, argv: list[str], debug: bool) -> int:
    try:
        return COMMANDS[command](argv)
    except KeyboardInterrupt:
        print(f"gvpo {command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if debug:
            raise
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"gvpo {command}: error: {lines[0]}", file=sys.stderr)
        print(f"(the traceback: add --debug or set {DEBUG_ENV}=1)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"gvpo: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: gvpo {train,eval,compare} [...] [--debug]; gvpo COMMAND --help for details")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return _run(argv[0], argv[1:], debug)


if __name__ == "__main__":
    sys.exit(main())

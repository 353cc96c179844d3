"""User errors end `gvpo` with one or two lines and a non-zero status; --debug / GVPO_DEBUG show the traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gvpo.cli import main

SMALL = ["max_steps=1", "prompts_per_step=2", "num_generations=2", "max_completion_length=4", "progress_bar=false",
         "save_steps=0", "num_eval=2"]


def run_cli(capsys, args):
    try:
        code = main(args)
    except SystemExit as e:  # argparse-style one-line errors exit this way
        code = e.code
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and 1 <= len(err.strip().splitlines()) <= 2, err
    return err


def test_a_missing_data_file_is_named_before_the_model_loads(tmp_path, capsys):
    err = run_cli(capsys, ["train", "dataset=/no/such/data.jsonl", "model_name_or_path=/no/such/model",
                           f"output_dir={tmp_path / 'run1'}", *SMALL])
    assert "gvpo train: error: /no/such/data.jsonl does not exist" in err
    assert not (tmp_path / "run1").exists()  # nothing written: a corrected command starts a fresh run there


def test_a_bad_json_line_and_a_row_without_the_prompt_column(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": oops}\n')
    err = run_cli(capsys, ["train", f"dataset={bad}", f"output_dir={tmp_path / 'run2'}", *SMALL])
    assert "bad.jsonl, line 2: not valid JSON" in err
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": i + 1}) + "\n" for i in range(5)))
    err = run_cli(capsys, ["train", f"dataset={rows}", "model_name_or_path=/no/such/model",
                           f"output_dir={tmp_path / 'run3'}", *SMALL])
    assert "row 0: missing column 'prompt'" in err and "prompt_column='problem'" in err


def test_an_unreadable_data_file(tmp_path, capsys, monkeypatch):
    import gvpo.data

    path = tmp_path / "secret.jsonl"
    path.write_text('{"prompt": "1+1="}\n')
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: refuse it the way the OS would for anyone else

        def refuse(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr(gvpo.data, "open", refuse, raising=False)
    err = run_cli(capsys, ["train", f"dataset={path}", f"output_dir={tmp_path / 'run4'}", *SMALL])
    assert f"cannot read {path}: Permission denied" in err


def test_a_model_that_is_neither_local_nor_reachable(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without a hub
    err = run_cli(capsys, ["train", "model_name_or_path=someorg/not-downloaded", f"output_dir={tmp_path / 'run5'}",
                           *SMALL])
    assert "no such local folder, and the Hugging Face hub could not provide it" in err
    assert "A local folder (with config.json) works" in err
    err = run_cli(capsys, ["train", "model_name_or_path=./no/such/model", f"output_dir={tmp_path / 'run6'}", *SMALL])
    assert "'./no/such/model': no such folder" in err


def test_a_bad_yaml_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  model_name_or_path: [default\n")
    err = run_cli(capsys, ["train", "--config", str(path)])
    assert "bad.yaml: not valid YAML at line" in err


def test_an_unknown_benchmark_before_the_model_loads(capsys):
    err = run_cli(capsys, ["eval", "--model", "/no/such/model", "--benchmarks", "math500,math5000"])
    assert "'math5000'" in err and "unknown" in err


def test_compare_a_missing_run(tmp_path, capsys):
    assert "no metrics.jsonl" in run_cli(capsys, ["compare", str(tmp_path / "nope")])


def test_a_failing_reward_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("def broken(completions, **kw):\n    raise KeyError('score')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_rewards", raising=False)  # another test may have cached one
    err = run_cli(capsys, ["train", "reward_funcs=broken_rewards:broken", f"output_dir={tmp_path / 'run'}", *SMALL])
    assert "reward function 'broken' raised KeyError: 'score'" in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        main(["train", "--debug", "dataset=/no/such/data.jsonl", f"output_dir={tmp_path / 'run7'}", *SMALL])
    monkeypatch.setenv("GVPO_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["train", "dataset=/no/such/data.jsonl", f"output_dir={tmp_path / 'run8'}", *SMALL])


def test_the_installed_command_prints_no_traceback(tmp_path):
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.pop("GVPO_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "gvpo.cli", "train", "dataset=missing.jsonl",
                           f"output_dir={tmp_path / 'run9'}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"gvpo train: error: {Path.cwd() / 'missing.jsonl'} does not exist (path_or_name='missing.jsonl'); give a "
        f".jsonl, .json or .parquet file, or a Hugging Face dataset name",
        "(the traceback: add --debug or set GVPO_DEBUG=1)"]

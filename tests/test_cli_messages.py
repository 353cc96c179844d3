"""What a new user reads: gvpo eval's one-line errors and written paths, compare's output folder, a reward
module next to the data, template=chat."""

import json
import sys

import pytest

from gvpo.cli import main
from gvpo.scoring import resolve_reward


def eval_error(capsys, *flags):
    with pytest.raises(SystemExit) as e:
        main(["eval", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_eval_errors_are_one_line_with_flags_as_the_parser_takes_them(capsys, tmp_path):
    err = eval_error(capsys, "--benchmarks", "math500,mth500")
    assert err.startswith("gvpo eval: --benchmarks math500,mth500: unknown 'mth500'") and "aime24" in err
    err = eval_error(capsys, "--template", "fancy")
    assert "--template fancy: choose one of plain, qwen_math, chat" in err
    err = eval_error(capsys, "--n", "4", "--temperature", "0")
    assert "--temperature 0.6" in err
    err = eval_error(capsys, "--data_dir", str(tmp_path / "nowhere"))
    assert "--data_dir" in err and "data_dir=/path" not in err and str(tmp_path / "nowhere") in err
    eval_error(capsys, "--limit", "abc")  # argparse's own errors are one line too


def test_eval_prints_where_it_wrote_each_file_and_explains_long_prompts(tmp_path, capfd, caplog):
    out = tmp_path / "eval"
    code = main(["eval", "--benchmarks", "math500,gsm8k", "--limit", "3", "--max_new_tokens", "4",
                 "--template", "plain", "--output_dir", str(out)])
    captured = capfd.readouterr()  # file descriptors: transformers' logger writes to the real stderr
    assert code == 0
    for name in ("math500", "gsm8k"):
        assert f"wrote {out / name}.json" in captured.out and (out / f"{name}.json").exists()
    # The embedded tokenizer's model_max_length is 256; our own note replaces the tokenizer's alarming one.
    long_ones = json.loads((out / "math500.json").read_text())["prompts_over_max_length"]
    assert long_ones > 0 and f"note: {long_ones} of 3 math500 prompts" in captured.out
    assert "model_max_length (256 tokens)" in captured.out
    assert "indexing errors" not in captured.out + captured.err + caplog.text


def test_eval_of_a_run_folder_uses_its_latest_checkpoint(tmp_path, capsys, tiny_model_dir):
    run = tmp_path / "r"
    assert main(["train", f"model_name_or_path={tiny_model_dir}", f"output_dir={run}", "max_steps=1",
                 "prompts_per_step=2", "num_generations=2", "max_completion_length=2", "num_eval=2",
                 "progress_bar=false"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--benchmarks", "gsm8k", "--limit", "1", "--max_new_tokens", "2",
                 "--template", "plain", "--output_dir", str(tmp_path / "e")]) == 0
    assert f"model: {run / 'checkpoints' / 'step-000001'}" in capsys.readouterr().out


def test_compare_writes_next_to_the_runs_not_into_the_working_directory(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    for name, acc in (("a", 0.5), ("b", 0.7)):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "eval_accuracy": acc, "reward_mean": acc}) + "\n" for s in range(3)))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["compare", str(runs / "a"), str(runs / "b")]) == 0
    assert f"plot: {runs / 'compare-a-b.png'}" in capsys.readouterr().out
    assert (runs / "compare-a-b.png").stat().st_size > 1000 and not list(cwd.iterdir())


def test_module_function_rewards_import_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_cwd_test.py").write_text(
        "def exact(prompts, completions, answer, **kw):\n    return [float(c == a) for c, a in zip(completions, answer)]\n")
    monkeypatch.chdir(tmp_path)
    # As under the `gvpo` console script: neither the current directory nor "" is on the path.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_rewards_cwd_test", raising=False)
    func = resolve_reward("my_rewards_cwd_test:exact")
    assert func([""], ["5"], answer=["5"]) == [1.0]
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz:f'"):
        resolve_reward("no_such_module_xyz:f")

"""Levels 3 and 4: the CLI end to end on a tiny model, and resumed == uninterrupted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY, assert_same_run, crash_after_checkpoint
from ptune import rundir
from ptune.train import checkpoint
from ptune.cli import main

SUMMARY_KEYS = {"method", "model", "task", "steps", "trainable_params", "total_params", "wall_time_s",
                "train_tokens_per_s", "peak_memory_mb", "final_train_loss", "eval", "best"}


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "outputs").glob("*/*") if p.is_dir())


def train(*overrides) -> int:
    return main(["train", "model=tiny-gpt2", *TINY, *overrides])


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_train_writes_the_run_directory(in_tmp, data_dir, capsys):
    assert train() == 0
    [run] = run_dirs(in_tmp)
    out = capsys.readouterr().out
    assert f"run: {run.relative_to(in_tmp)}" in out and "e2e dev bleu:" in out
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "train.log", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter_best/adapter_model.safetensors", "predictions/dev.jsonl"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == 6 and summary["method"] == "prefix" and summary["model"] == "tiny-gpt2"
    assert {"bleu", "nist", "rouge_l", "cider"} <= set(summary["eval"])
    assert summary["best"]["step"] in (3, 6)
    # the adapter holds the collapsed prefix only; checkpoints hold the MLP too
    assert list(load_file(run / "adapter/adapter_model.safetensors")) == ["prefix"]
    ckpts = checkpoint.list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step-3", "step-6"]
    assert {"prefixes.decoder.embedding.weight", "prefixes.decoder.mlp.0.weight"} <= set(load_file(ckpts[-1] / "trainable.safetensors"))
    assert checkpoint.verify(ckpts[-1]) is None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"step", "epoch", "loss", "lr", "tokens_per_s"} <= set(records[0])
    assert any("eval/bleu" in r for r in records)
    config = (run / "config.yaml").read_text()
    assert "${" not in config and "data_dir: " + str(data_dir) in config  # fully resolved
    for path in run.rglob("*"):  # nothing is a pickle
        if path.is_file():
            assert not path.read_bytes()[:2] == b"\x80\x04", path
            assert path.suffix in {".yaml", ".jsonl", ".json", ".log", ".safetensors"}, path


def test_resumed_equals_uninterrupted(in_tmp, data_dir, monkeypatch):
    assert train() == 0
    [full] = run_dirs(in_tmp)

    restore = crash_after_checkpoint(monkeypatch, 3)  # "kill" the run right after its step-3 checkpoint
    assert train() == 130
    restore()
    broken = next(p for p in run_dirs(in_tmp) if p != full)
    assert not (broken / "summary.json").exists()
    assert main(["train", f"resume={broken}"]) == 0
    assert run_dirs(in_tmp) == sorted([full, broken])  # resumed in place, no new directory

    assert_same_run(full, broken)  # tensors bit for bit, metrics, summary


def test_resume_refuses_a_changed_model_and_keeps_the_run(in_tmp, data_dir, capsys):
    assert train("trainer.max_steps=3") == 0
    [run] = run_dirs(in_tmp)
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", f"resume={run}", "model=tiny-llama"]) == 2
    assert main(["train", f"resume={run}", "method.num_virtual_tokens=3"]) == 2
    assert main(["train", f"resume={in_tmp}"]) == 2  # not a run directory
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "keeps its model" in err[0] and "not a ptune run directory" in err[2]
    assert snapshot(run) == before


def test_multirun_writes_one_directory_per_job_and_a_summary(in_tmp, data_dir):
    assert train("-m", "method.num_virtual_tokens=1,2", "trainer.max_steps=2", "trainer.eval_every=2") == 0
    [sweep] = [p for p in (in_tmp / "outputs").glob("*/*") if (p / "summary.csv").exists()]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and "method.num_virtual_tokens=1" in rows[1] and "method.num_virtual_tokens=2" in rows[2]
    assert "eval.bleu" in rows[0]
    assert "| job |" in (sweep / "summary.md").read_text()
    for job in ("0", "1"):
        assert json.loads((sweep / job / "summary.json").read_text())["steps"] == 2


def test_eval_and_predict_on_a_finished_run(in_tmp, data_dir, capsys):
    assert train("trainer.max_steps=3") == 0
    [run] = run_dirs(in_tmp)
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", f"run={run}"]) == 0
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == summary["eval"]
    inputs = in_tmp / "mrs.jsonl"
    inputs.write_text(json.dumps({"mr": "name[The Eagle], food[French]"}) + "\n")
    assert main(["predict", f"run={run}", f"input={inputs}", f"output={in_tmp / 'p.jsonl'}"]) == 0
    [row] = [json.loads(line) for line in (in_tmp / "p.jsonl").read_text().splitlines()]
    assert row["mr"] == "name[The Eagle], food[French]" and isinstance(row["prediction"], str)


def test_hard_prompt_evaluates_without_training(in_tmp, data_dir):
    assert train("method=hard-prompt") == 0
    [run] = run_dirs(in_tmp)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["trainable_params"] == 0 and "bleu" in summary["eval"]


@pytest.mark.slow  # a real `python -m ptune` process per case (test_errors checks the messages in-process)
@pytest.mark.parametrize("args, words", [
    (["train", "method=nope"], "unknown method 'nope'"),
    (["train", "trainer.nope=3"], "unknown key 'trainer.nope'"),
    (["train", "model=tiny-gpt2", "method.num_virtual_tokens=0"], "method.num_virtual_tokens=0 is invalid"),
    (["train", "--bogus"], "unexpected argument '--bogus'"),
    (["eval", "run=/nonexistent"], "is not a ptune run directory"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["train", "model=gpt2"], "not in the local cache and the hub cannot be reached"),
])
def test_bad_input_is_one_line_and_nonzero(in_tmp, args, words):
    proc = subprocess.run([sys.executable, "-m", "ptune", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert not (in_tmp / "outputs").exists() or not any((in_tmp / "outputs").rglob("summary.json"))


def test_help_lists_commands_groups_and_keys():
    out = subprocess.run([sys.executable, "-m", "ptune", "--help"], capture_output=True, text=True).stdout
    assert all(c in out for c in ("train", "eval", "predict"))
    out = subprocess.run([sys.executable, "-m", "ptune", "train", "--help"], capture_output=True, text=True).stdout
    for words in ("method", "[prefix]", "tiny-gpt2", "method.num_virtual_tokens", "trainer.max_steps",
                  "trainer.precision", "task.data_dir"):
        assert words in out


def test_run_directories_are_unique_within_one_second(tmp_path):
    dirs = [rundir.new_run_dir(tmp_path) for _ in range(5)]
    assert len(set(dirs)) == 5 and all(d.is_dir() for d in dirs)


@pytest.mark.slow  # a training process stopped by a signal
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])  # USR1/USR2: what clusters send before a preemption
def test_a_signal_saves_a_checkpoint_and_resume_finishes(in_tmp, data_dir, sig):
    """SIGTERM (or SIGUSR1) mid-run: checkpoint, one clear line, non-zero exit; resume then completes the run."""
    import signal
    import time

    args = [sys.executable, "-m", "ptune", "train", "model=tiny-llama", *TINY, "trainer.max_steps=100000",
            "trainer.save_every=100000", "trainer.eval_every=100000"]
    proc = subprocess.Popen(args, cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(in_tmp.glob("outputs/*/*/metrics.jsonl")):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by {sig} at step ") and "ptune train resume=" in last
    [run] = run_dirs(in_tmp)
    [ckpt] = checkpoint.list_checkpoints(run / "checkpoints")
    step = int(ckpt.name.split("-")[1])
    assert step >= 1 and checkpoint.verify(ckpt) is None
    assert main(["train", f"resume={run}", f"trainer.max_steps={step + 2}"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 2

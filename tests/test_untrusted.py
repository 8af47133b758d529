"""A run directory is untrusted input, and every command validates like train (docs/errors.md).

- A saved config.yaml cannot make a loading command run code: `model.trust_remote_code` comes only
  from the command line (a planted `auto_map` whose import would create a marker file).
- A saved config is checked before anything is built: YAML, groups, keys, bounds, interpolations.
- The run-loading commands share one table of keys and bad values: each bad value is one line,
  exit 2, and no run directory changes.
- Nothing writes where it was not asked to; settings that cannot work are refused; divergence and
  unusable checkpoints are reported.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

from ptune.cli import main

SST2 = ["model=tiny-llama", "task=sst2", "method=prompt", "method.num_virtual_tokens=3", "task.max_train_samples=16",
        "task.max_eval_samples=4", "trainer.batch_size=4", "trainer.eval_batch_size=8", "trainer.log_every=1",
        "trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2"]


def tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *SST2, f"output_dir={out}"]) == 0
    return next(p for p in out.rglob("config.yaml")).parent


@pytest.fixture()
def copy(run, tmp_path):
    """A fresh copy of the finished run, to edit."""
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


def edit_config(run_dir: Path, change) -> None:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    change(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture()
def rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"sentence": "a gorgeous movie"}\n{"sentence": "dull"}\n')
    return path


# -- security: a run directory cannot make ptune run code ------------------------------------------
@pytest.fixture()
def planted(copy, tmp_path):
    """The run re-pointed at a model folder whose config.json maps AutoConfig to evil.py, which
    creates `marker` when imported; the saved config sets model.trust_remote_code=true."""
    from ptune.build import build_backbone, load_run

    _, cfg = load_run(copy)
    backbone = build_backbone(cfg)
    folder = tmp_path / "model"
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    marker = tmp_path / "marker"
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))

    def change(c):
        c["model"] = {"name": "gpt2", "kind": "causal", "source": "hub", "name_or_path": str(folder),
                      "trust_remote_code": True}
    edit_config(copy, change)
    return copy, marker


@pytest.mark.parametrize("command", [
    lambda r, rows: ["eval", f"run={r}"],
    lambda r, rows: ["predict", f"run={r}", f"input={rows}", f"output={rows.parent / 'p.jsonl'}"],
    lambda r, rows: ["export", f"run={r}", f"out={rows.parent / 'peft'}"],
    lambda r, rows: ["serve", f"run={r}", "port=0"],
    lambda r, rows: ["train", f"resume={r}"],
], ids=["eval", "predict", "export", "serve", "resume"])
def test_a_saved_trust_remote_code_runs_no_code(planted, rows, capsys, command):
    run_dir, marker = planted
    before = tree(run_dir)
    assert main(command(run_dir, rows)) == 2
    line = one_error_line(capsys)
    assert "model.trust_remote_code=true" in line and "trust_remote_code=true" in line, line
    assert not marker.exists(), "the run directory made ptune import the model folder's code"
    assert tree(run_dir) == before


def test_the_command_lines_trust_remote_code_is_what_loads(planted, rows, capsys):
    """The key does something: given on the command line, the model folder's code is imported."""
    run_dir, marker = planted
    assert main(["eval", f"run={run_dir}", "trust_remote_code=true"]) == 0
    assert marker.exists()


# -- a saved config is checked before anything is built ---------------------------------------------
SAVED = {
    "huge-prompt": (lambda c: c["method"].update(num_virtual_tokens=100_000_000), "method.num_virtual_tokens"),
    "huge-tiny-model": (lambda c: c["model"]["tiny"].update(hidden_size=10**9), "model.tiny.hidden_size"),
    "env-interpolation": (lambda c: c["task"].update(data_dir="${oc.env:HOME}"), "interpolation"),
    "unknown-key": (lambda c: c["method"].update(evil=1), "unknown key 'method.evil'"),
    "missing-trainer-key": (lambda c: c["trainer"].pop("max_steps"), "lacks trainer.max_steps"),
    "missing-group": (lambda c: c.pop("task"), "no task group"),
    "unknown-method": (lambda c: c["method"].update(name="lora"), "method.name='lora'"),
    "negative-batch": (lambda c: c["trainer"].update(eval_batch_size=-1), "trainer.eval_batch_size=-1"),
    "lr-text": (lambda c: c["trainer"].update(lr="fast"), "trainer.lr='fast'"),
    "head-list": (lambda c: c["task"].update(head=["linear"]), "task.head=["),
    "head-unknown": (lambda c: c["task"].update(head="evil"), "task.head='evil' is not one of"),
}


@pytest.mark.parametrize("case", SAVED)
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_bad_saved_config_is_one_line_and_nothing_is_written(copy, capsys, case, command):
    change, words = SAVED[case]
    edit_config(copy, change)
    before = tree(copy)
    argv = ["eval", f"run={copy}"] if command == "eval" else ["train", f"resume={copy}"]
    assert main(argv) == 2
    assert words in one_error_line(capsys)
    assert tree(copy) == before  # train.log not appended to, nothing created


@pytest.mark.parametrize("text, words", [("", "holds no config"), ("method: [unclosed", "not valid YAML"),
                                         ("- a\n- b\n", "holds no config"), (b"\xff\xfe", "cannot be read")])
def test_an_invalid_or_empty_config_yaml_is_one_line(copy, capsys, text, words):
    path = copy / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = tree(copy)
    assert main(["train", f"resume={copy}"]) == 2
    assert words in one_error_line(capsys)
    assert tree(copy) == before


def test_resume_reads_overrides_with_trains_grammar(copy):
    assert main(["train", f"resume={copy}", "trainer.lr=1e-3", "trainer.max_steps=3"]) == 0
    saved = json.loads((copy / "summary.json").read_text())
    assert saved["steps"] == 3


# -- every command validates like train: one table of keys and bad values ---------------------------
BAD_VALUES = {
    "batch_size": ["-1", "0", "abc", "1.5", "", "99999999999"],
    "split": ["", " "],
    "host": [""],
    "adapter": ["adapter_worst", "../x"],
    "trust_remote_code": ["yes", "1"],
    "port": ["-1", "70000", "http"],
    "max_batch": ["0", "-5"],
    "max_input_chars": ["0", "x"],
    "max_batch_rows": ["0", "-1", "x"],
    "max_wait_ms": ["-1", "0.5x"],
    "max_connections": ["0"],
    "max_tokens": ["0", "many"],
    "workers": ["0", "two"],
    "timeout": ["0", "1.5"],
}
COMMANDS = {  # command -> (the keys it takes from BAD_VALUES, its other arguments)
    "eval": (["batch_size", "adapter", "trust_remote_code", "split"], lambda r, rows: []),
    "predict": (["batch_size", "adapter", "trust_remote_code"],
                lambda r, rows: [f"input={rows}", f"output={rows.parent / 'p.jsonl'}"]),
    "serve": (["adapter", "trust_remote_code", "host", "port", "max_batch", "max_input_chars", "max_batch_rows",
               "max_wait_ms", "max_connections", "max_tokens", "workers", "timeout"], lambda r, rows: ["port=0"]),
    "export": (["adapter", "trust_remote_code"], lambda r, rows: [f"out={rows.parent / 'peft'}"]),
}
CASES = [(c, k, v) for c, (keys, _) in COMMANDS.items() for k in keys for v in BAD_VALUES[k]]


@pytest.mark.parametrize("command, key, value", CASES, ids=[f"{c}-{k}={v}" for c, k, v in CASES])
def test_every_bad_value_of_every_command_is_one_line(run, rows, capsys, command, key, value):
    before = tree(run)
    others = [a for a in COMMANDS[command][1](run, rows) if not a.startswith(f"{key}=")]
    assert main([command, f"run={run}", *others, f"{key}={value}"]) == 2
    assert one_error_line(capsys).startswith(f"error: {key}={value!r}")
    assert tree(run) == before


@pytest.mark.parametrize("override, words", [
    ("task.max_eval_samples=-2", "task.max_eval_samples=-2 is invalid"),
    ("task.max_eval_samples=abc", "task.max_eval_samples='abc' is invalid"),
    ("task.max_eval_samples=1.5", "task.max_eval_samples=1.5 is invalid"),
    ("task.nope=1", "task.nope is not a task key"),
])
def test_eval_task_overrides_meet_trains_checks(run, capsys, override, words):
    before = tree(run)
    assert main(["eval", f"run={run}", override]) == 2
    assert words in one_error_line(capsys)
    assert tree(run) == before


# -- nothing writes where it was not asked to --------------------------------------------------------
def test_predict_never_writes_into_the_run_it_reads(run, rows, capsys):
    before = tree(run)
    for target in ("config.yaml", "adapter/adapter_config.json", "new.jsonl"):
        assert main(["predict", f"run={run}", f"input={rows}", f"output={run / target}"]) == 2
        assert "is inside the run directory" in one_error_line(capsys)
    assert main(["export", f"run={run}", f"out={run / 'peft'}"]) == 2
    assert "is inside the run directory" in one_error_line(capsys)
    assert tree(run) == before


def test_two_predicts_without_output_keep_both_files(run, rows):
    before = tree(run)
    assert main(["predict", f"run={run}", f"input={rows}"]) == 0
    assert main(["predict", f"run={run}", f"input={rows}"]) == 0
    outs = sorted(p.name for p in rows.parent.glob("rows*.predictions.jsonl"))
    assert outs == ["rows-1.predictions.jsonl", "rows.predictions.jsonl"]
    assert tree(run) == before


def test_a_run_is_never_nested_in_another(run, capsys):
    before = tree(run)
    assert main(["train", *SST2, f"output_dir={run / 'inner'}"]) == 2
    assert "is inside the run directory" in one_error_line(capsys)
    assert tree(run) == before


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_input_text_is_one_line(run, tmp_path, capsys, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"sentence": text}) + "\n")
    assert main(["predict", f"run={run}", f"input={path}"]) == 2
    assert "has an empty 'sentence'" in one_error_line(capsys)


# -- settings that cannot work are refused ------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (["trainer.lr=inf"], "trainer.lr=inf is invalid"),
    (["trainer.lr=nan"], "trainer.lr=nan is invalid"),
    (["trainer.max_grad_norm=inf"], "trainer.max_grad_norm=inf is invalid"),
    (["task.head=verbalizer", "task.verbalizer={negative: good, positive: good}"], "stands for both"),
    (["task.head=verbalizer", "task.verbalizer.positive=5"], "task.verbalizer.positive=5"),
    (["method.num_virtual_tokens=100000000"], "must be at most 10,000"),
    (["+task.decoding=beam"], "unknown key 'task.decoding'"),
    (["+trainer.log_to=mlflow"], "unknown key 'trainer.log_to'"),
])
def test_a_setting_that_cannot_work_is_refused(tmp_path, capsys, overrides, words):
    assert main(["train", *SST2, f"output_dir={tmp_path}", *overrides]) == 2
    assert words in one_error_line(capsys)
    assert not any(tmp_path.iterdir())


def test_a_linear_head_on_a_generation_task_is_refused(tmp_path, capsys):
    data = tmp_path / "gen.csv"
    data.write_text("text,label\nhello,world\nfoo,bar\n")
    argv = ["train", "model=tiny-llama", "task=custom", "task.type=generation", f"task.train_file={data}",
            f"task.eval_file={data}", "task.head=linear", f"output_dir={tmp_path / 'out'}"]
    assert main(argv) == 2
    assert "task.head=linear is a classification head" in one_error_line(capsys)


def test_an_exploding_loss_is_reported_as_divergence(tmp_path, capsys):
    assert main(["train", *SST2, "trainer.max_steps=6", "trainer.lr=100", f"output_dir={tmp_path}"]) == 0
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["diverged"] is True and summary["final_train_loss"] > 3 * summary["first_train_loss"]
    assert "warning: training diverged" in capsys.readouterr().out
    assert "training diverged" in next(tmp_path.rglob("train.log")).read_text()


def test_a_normal_run_is_not_called_divergent(run):
    assert json.loads((run / "summary.json").read_text())["diverged"] is False


# -- checkpoints after a NaN, and on a full disk ------------------------------------------------------
def test_the_advice_after_a_nan_names_only_a_usable_checkpoint(copy):
    """A checkpoint whose optimizer state holds inf verifies (its files are intact) but cannot be
    continued from: latest_usable skips it; with none left the advice says so."""
    from safetensors.torch import load_file, save_file

    from ptune.train import checkpoint
    from ptune.train.loop import _stop_non_finite
    from ptune.errors import PtuneError

    [step] = checkpoint.list_checkpoints(copy / "checkpoints")
    assert checkpoint.latest_usable(copy / "checkpoints") == step
    opt = load_file(step / "optimizer.safetensors")
    save_file({k: torch.full_like(v, float("inf")) if v.is_floating_point() else v for k, v in opt.items()},
              step / "optimizer.safetensors")
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["optimizer.safetensors"] = checkpoint._sha256(step / "optimizer.safetensors")
    (step / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.verify(step) is None and checkpoint.latest_usable(copy / "checkpoints") is None
    with pytest.raises(PtuneError, match="No usable checkpoint was written before it"):
        _stop_non_finite("training loss became nan", 3, copy)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    from ptune.train import checkpoint

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(checkpoint, "save_file", full)
    assert main(["train", *SST2, f"output_dir={tmp_path}"]) == 2
    assert "could not write checkpoint step-2" in one_error_line(capsys)
    assert not list(tmp_path.rglob(".step-*"))


def test_a_corrupt_model_safetensors_is_one_line(tmp_path, capsys):
    from ptune.build import build_backbone
    from ptune.config import compose

    folder = tmp_path / "model"
    backbone = build_backbone(compose(["model=tiny-llama"]))
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    argv = ["train", *SST2, "model=gpt2", f"model.name_or_path={folder}", f"output_dir={tmp_path / 'o'}"]
    assert main(argv) == 2
    assert "cannot be read" in one_error_line(capsys)


def test_resume_of_a_trusting_run_needs_the_command_line_to_say_so(planted, capsys):
    run_dir, marker = planted
    assert main(["train", f"resume={run_dir}", "model.trust_remote_code=true", "trainer.max_steps=3"]) == 0
    assert marker.exists() and json.loads((run_dir / "summary.json").read_text())["steps"] == 3

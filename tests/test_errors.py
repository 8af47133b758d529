"""Bad input (docs/errors.md's table): each case exits non-zero with one `error:` line that names
the problem and the fix, prints no traceback, and leaves every existing run directory as it was.

Cases run through `ptune.cli.main` in one working directory that holds a finished run; the tree
of outputs/ is hashed before and after each case. Two also run as a real `ptune` process.
"""

import csv
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY, Marker
from ptune.cli import main

BASE = ["train", "model=tiny-gpt2", *TINY, "trainer.max_steps=2", "trainer.eval_every=2"]
SST2 = ["train", "model=tiny-bert", "task=sst2", "method=fine-tune", "trainer.max_steps=2", "trainer.batch_size=4",
        "task.max_train_samples=8", "task.max_eval_samples=4"]


def tree(directory: Path) -> dict:
    """Every file's sha256 and every folder under `directory`: what 'unchanged' means."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def _e2e_rows(data_dir: Path, n: int) -> list[list[str]]:
    with open(data_dir / "e2e" / "train.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        return [next(reader) for _ in range(n)]


def _csv(rows: list[list[str]], delimiter: str = ",", header=("mr", "ref")) -> str:
    import io

    out = io.StringIO()
    w = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return out.getvalue()


@pytest.fixture(scope="module")
def ws(tmp_path_factory, data_dir):
    """A working directory with one finished run and the bad files the cases point at."""
    root = tmp_path_factory.mktemp("errors")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    assert main(BASE) == 0
    [run] = [p for p in (root / "outputs").glob("*/*") if (p / "summary.json").exists()]

    good = _csv(_e2e_rows(data_dir, 40))
    good_text = good.encode()

    def e2e(name: str, train: str | bytes, dev: str | bytes | None = None) -> Path:
        d = root / "data" / name
        (d / "e2e").mkdir(parents=True)
        for split, text in (("train", train), ("dev", good if dev is None else dev)):
            (d / "e2e" / f"{split}.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
        return d

    rows = _e2e_rows(data_dir, 40)
    sst = "sentence\tlabel\n" + "".join(f"a fine film number {i}\t{i % 2}\n" for i in range(12))

    def sst2(name: str, train: str) -> Path:
        d = root / "data" / name
        (d / "sst2").mkdir(parents=True)
        (d / "sst2" / "train.tsv").write_text(train)
        (d / "sst2" / "dev.tsv").write_text(sst)
        return d

    models = root / "models"
    (models / "empty").mkdir(parents=True)
    (models / "pickle").mkdir()
    (models / "pickle" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    (models / "pickle" / "pytorch_model.bin").write_bytes(pickle.dumps(Marker(root / "UNPICKLED")))
    (models / "weights.safetensors").write_bytes(b"not a directory")
    (models / "remote").mkdir()
    (models / "remote" / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (models / "remote" / "evil.py").write_text(f"open({str(root / 'REMOTE_CODE_RAN')!r}, 'w').close()\n")
    (models / "remote" / "model.safetensors").write_bytes(b"")
    (root / "a_file").write_text("")
    (root / "inputs.jsonl").write_text('{"mr": "name[The Eagle]"}\n{"mr": "name[The Mill]"\n')

    paths = SimpleNamespace(
        root=root, run=run, models=models,
        no_data=root / "data" / "none",
        e2e_empty=e2e("empty", ""),
        e2e_header_only=e2e("header", "mr,ref\n"),
        e2e_missing_column=e2e("column", _csv(rows, header=("mr", "text"))),
        e2e_tabs=e2e("tabs", _csv(rows, delimiter="\t")),
        e2e_cut_in_quotes=e2e("cut-quote", good_text[: good_text.rindex(b'"name[') + 20]),
        e2e_cut_line=e2e("cut-line", good + "name[The Mill]\n"),
        e2e_empty_ref=e2e("empty-ref", _csv(rows[:5] + [[rows[5][0], "  "]] + rows[6:])),
        e2e_not_utf8=e2e("latin1", "mr,ref\n".encode() + "name[Café Rouge],Café\n".encode("latin-1") * 30),
        e2e_bad_dev=e2e("bad-dev", good, dev="mr;ref\nname[x];y\n"),
        sst2_commas=sst2("sst-commas", sst.replace("\t", ",")),
        sst2_label=sst2("sst-label", sst + "a dull film\t2\n"),
        sst2_empty=sst2("sst-empty", sst + " \t1\n"),
    )
    (paths.no_data).mkdir(parents=True)
    yield paths
    mp.undo()


# (id, argv from the workspace, words the one error line must hold)
CASES = [
    ("unknown-method", lambda p: ["train", "method=nope"], "unknown method 'nope'; choose one of"),
    ("unknown-model", lambda p: ["train", "model=gpt5"], "unknown model 'gpt5'; choose one of"),
    ("unknown-task", lambda p: ["train", "task=squad"], "unknown task 'squad'; choose one of"),
    ("unknown-key", lambda p: ["train", "trainer.nope=1"], "unknown key 'trainer.nope'"),
    ("unknown-method-key", lambda p: [*BASE, "method.nope=1"], "unknown key 'method.nope'"),
    ("virtual-tokens-zero", lambda p: [*BASE, "method.num_virtual_tokens=0"],
     "method.num_virtual_tokens=0 is invalid: must be an integer >= 1"),
    ("virtual-tokens-negative", lambda p: [*BASE, "method.num_virtual_tokens=-3"],
     "method.num_virtual_tokens=-3 is invalid"),
    ("prefix-longer-than-context", lambda p: [*BASE, "method.num_virtual_tokens=500"],
     "more than model tiny-gpt2's 512; lower method.num_virtual_tokens"),
    ("prompt-longer-than-context", lambda p: [*BASE, "method=prompt", "method.num_virtual_tokens=490"],
     "more than model tiny-gpt2's 512"),
    ("sweep-without-m", lambda p: [*BASE, "method.num_virtual_tokens=1,2"], "comma-separated value is a sweep: add -m"),
    ("negative-lr", lambda p: [*BASE, "trainer.lr=-1"], "trainer.lr=-1 is invalid: must be a number > 0"),
    ("batch-size-zero", lambda p: [*BASE, "trainer.batch_size=0"], "trainer.batch_size=0 is invalid"),
    ("unknown-precision", lambda p: [*BASE, "trainer.precision=fp8"], "trainer.precision='fp8' is invalid: choose one of"),
    ("fp16-on-cpu", lambda p: [*BASE, "trainer.precision=fp16"], "trainer.precision=fp16 needs a GPU"),
    ("flag-not-override", lambda p: ["train", "--bogus"], "unexpected argument '--bogus'"),
    ("unknown-command", lambda p: ["frobnicate"], "unknown command 'frobnicate'"),
    ("hub-model-offline", lambda p: [*BASE, "model=gpt2"], "not in the local cache and the hub cannot be reached"),
    ("model-dir-without-weights", lambda p: [*BASE, "model=gpt2", f"model.name_or_path={p.models / 'empty'}"],
     "holds no model.safetensors; point model.name_or_path at a directory with safetensors weights"),
    ("model-dir-pickle-only", lambda p: [*BASE, "model=gpt2", f"model.name_or_path={p.models / 'pickle'}"],
     "holds only pickled weights (pytorch_model.bin), which ptune does not load"),
    ("model-path-is-a-file", lambda p: [*BASE, "model=gpt2", f"model.name_or_path={p.models / 'weights.safetensors'}"],
     "is a file; point it at the model's directory"),
    ("model-needs-remote-code", lambda p: [*BASE, "model=gpt2", f"model.name_or_path={p.models / 'remote'}"],
     "needs its own Python code to load, which ptune does not run unless you trust it: set model.trust_remote_code=true"),
    ("data-dir-without-files", lambda p: [*BASE, f"task.data_dir={p.no_data}"],
     "train.csv does not exist; set task.data_dir"),
    ("data-file-empty", lambda p: [*BASE, f"task.data_dir={p.e2e_empty}"], "train.csv is empty; expected a CSV with the header mr,ref"),
    ("data-header-only", lambda p: [*BASE, f"task.data_dir={p.e2e_header_only}"], "train.csv has a header but no rows"),
    ("data-missing-column", lambda p: [*BASE, f"task.data_dir={p.e2e_missing_column}"],
     "expected a CSV with the header mr,ref, found ['mr', 'text']"),
    ("data-wrong-delimiter", lambda p: [*BASE, f"task.data_dir={p.e2e_tabs}"], "(it looks tab-separated)"),
    ("data-cut-inside-quotes", lambda p: [*BASE, f"task.data_dir={p.e2e_cut_in_quotes}"],
     "line 41: unexpected end of data (an unclosed quote, or a file cut short)"),
    ("data-short-row", lambda p: [*BASE, f"task.data_dir={p.e2e_cut_line}"],
     "line 42: 1 field(s) where the header has 2"),
    ("data-empty-text", lambda p: [*BASE, f"task.data_dir={p.e2e_empty_ref}"], "line 7: empty 'ref'"),
    ("data-not-utf8", lambda p: [*BASE, f"task.data_dir={p.e2e_not_utf8}"], "train.csv: not UTF-8 text"),
    ("eval-file-malformed", lambda p: [*BASE, f"task.data_dir={p.e2e_bad_dev}"],
     "dev.csv: expected a CSV with the header mr,ref, found ['mr;ref']"),
    ("eval-split-missing", lambda p: [*BASE, "trainer.eval_split=test", f"task.data_dir={p.e2e_bad_dev}"],
     "test.csv does not exist"),
    ("sst2-wrong-delimiter", lambda p: [*SST2, f"task.data_dir={p.sst2_commas}"],
     "expected a TSV with the header sentence<TAB>label, found ['sentence,label'] (it looks comma-separated)"),
    ("sst2-unknown-label", lambda p: [*SST2, f"task.data_dir={p.sst2_label}"], "line 14: label '2' is not one of 0, 1"),
    ("sst2-empty-sentence", lambda p: [*SST2, f"task.data_dir={p.sst2_empty}"], "line 14: empty 'sentence'"),
    ("fewer-examples-than-a-step", lambda p: [*BASE, "task.max_train_samples=2"], "2 training examples are fewer than one step needs"),
    ("resume-not-a-run", lambda p: ["train", f"resume={p.root}"], "is not a ptune run directory (no config.yaml)"),
    ("resume-changes-model", lambda p: ["train", f"resume={p.run}", "model=tiny-llama"],
     "resume: model=tiny-llama differs from the run's model 'tiny-gpt2'"),
    ("resume-changes-method", lambda p: ["train", f"resume={p.run}", "method=prompt"],
     "resume: method=prompt differs from the run's method 'prefix'"),
    ("resume-changes-method-key", lambda p: ["train", f"resume={p.run}", "method.num_virtual_tokens=3"],
     "resume: method.num_virtual_tokens=3 differs from the run's method.num_virtual_tokens=10"),
    ("resume-with-sweep", lambda p: ["train", "-m", f"resume={p.run}"], "resume= and -m cannot be combined"),
    ("output-dir-not-writable", lambda p: [*BASE, f"output_dir={p.root / 'a_file' / 'outputs'}"],
     "cannot create a run directory under"),
    ("eval-not-a-run", lambda p: ["eval", f"run={p.root}"], "is not a ptune run directory"),
    ("predict-missing-input", lambda p: ["predict", f"run={p.run}", f"input={p.root / 'nope.jsonl'}"],
     "nope.jsonl does not exist"),
    ("predict-bad-json-line", lambda p: ["predict", f"run={p.run}", f"input={p.root / 'inputs.jsonl'}"],
     "inputs.jsonl is not valid jsonl"),
]


@pytest.mark.parametrize("name, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_no_run(ws, capsys, name, argv, words):
    if name == "fp16-on-cpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    before = tree(ws.root / "outputs")
    capsys.readouterr()
    assert main(argv(ws)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], err
    assert "Traceback" not in err
    assert tree(ws.root / "outputs") == before
    assert not (ws.root / "UNPICKLED").exists() and not (ws.root / "REMOTE_CODE_RAN").exists()


def test_the_table_has_a_row_per_case():
    """docs/errors.md names every case above (by its id, in the test column)."""
    doc = (ROOT / "docs" / "errors.md").read_text()
    missing = [name for name, _, _ in CASES if f"`{name}`" not in doc]
    assert not missing and len(CASES) >= 30, missing


@pytest.mark.slow  # a real ptune process per case
@pytest.mark.parametrize("name", ["data-cut-inside-quotes", "output-dir-not-writable"])
def test_a_real_ptune_process_exits_2_with_one_line(ws, name):
    [(argv, words)] = [(a, w) for n, a, w in CASES if n == name]
    before = tree(ws.root / "outputs")
    exe = Path(sys.executable).with_name("ptune")
    proc = subprocess.run([str(exe), *argv(ws)], cwd=ws.root, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert tree(ws.root / "outputs") == before

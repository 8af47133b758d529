"""E2E evaluation: greedy and beam decoding, the test split grouped by MR, `ptune eval` overrides."""
import csv
import json

import pytest

from conftest import TINY
from ptune import tasks
from ptune.cli import compose, main
from ptune.errors import PtuneError


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """One finished tiny-gpt2 prefix run on E2E (greedy, as the default job)."""
    out = tmp_path_factory.mktemp("e2e_eval")
    assert main(["train", "model=tiny-gpt2", *TINY, "trainer.max_steps=3", f"output_dir={out}"]) == 0
    [run_dir] = sorted(p for p in out.glob("*/*") if p.is_dir())
    return run_dir


def test_default_job_decodes_greedily_and_beam_means_five():
    cfg = compose([])
    assert cfg.task.name == "e2e" and cfg.task.decoding == "greedy" and cfg.task.num_beams == 5
    assert tasks.build("e2e", **{"decoding": "beam", "num_beams": 5}).num_beams == 5
    assert tasks.build("e2e", decoding="greedy").num_beams == 1
    # configs saved before task.decoding existed: num_beams alone decided
    assert tasks.build("e2e", num_beams=1).num_beams == 1 and tasks.build("e2e", num_beams=4).num_beams == 4
    with pytest.raises(PtuneError, match="task.decoding='top-k' is invalid"):
        tasks.build("e2e", decoding="top-k")


def test_greedy_and_beam_both_decode_one_line(run, capsys):
    greedy = json.loads((run / "summary.json").read_text())["eval"]
    assert main(["eval", f"run={run}", "task.decoding=beam", "task.num_beams=3"]) == 0
    beam = json.loads((run / "eval_dev.json").read_text())
    assert beam["overrides"] == {"task.decoding": "beam", "task.num_beams": 3}
    assert set(beam["metrics"]) == set(greedy) == {"bleu", "nist", "rouge_l", "cider"}
    preds = [json.loads(line) for line in (run / "predictions/dev.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(isinstance(p["prediction"], str) and "\n" not in p["prediction"] for p in preds)
    # training kept each evaluation's predictions by step; the last one is the greedy run's own
    last = [json.loads(line) for line in (run / "predictions/dev-step3.jsonl").read_text().splitlines()]
    assert [p["mr"] for p in last] == [p["mr"] for p in preds] and all("references" in p for p in last)
    # greedy again reproduces the run's own last evaluation
    assert main(["eval", f"run={run}"]) == 0
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == greedy


def test_test_split_is_scored_per_mr_with_all_its_references(run, data_dir, capsys):
    with open(data_dir / "e2e" / "test.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    grouped: dict[str, list[str]] = {}
    for r in rows:
        grouped.setdefault(r["mr"], []).append(r["ref"])
    assert len(rows) == 4693 and len(grouped) == 630  # the official test set: 630 MRs
    mrs, refs = tasks.build("e2e", data_dir=str(data_dir), max_eval_samples=None).references("test")
    assert mrs == list(grouped) and refs == [grouped[m] for m in mrs]

    assert main(["eval", f"run={run}", "split=test", "task.max_eval_samples=8"]) == 0
    assert "test: 8 examples" in capsys.readouterr().out
    out = json.loads((run / "eval_test.json").read_text())
    assert out["split"] == "test" and out["examples"] == 8
    records = [json.loads(line) for line in (run / "predictions/test.jsonl").read_text().splitlines()]
    assert len(records) == 8 and len({r["mr"] for r in records}) == 8
    assert all(r["references"] == grouped[r["mr"]] for r in records)
    assert max(len(r["references"]) for r in records) > 1


@pytest.mark.parametrize("args, words", [
    (["task.decoding=sample"], "task.decoding='sample' is invalid"),
    (["task.decoding=beam", "task.num_beams=1"], "task.num_beams=1 is invalid with task.decoding=beam"),
    (["task.nope=1"], "task.nope is not a task key of this run"),
])
def test_bad_eval_overrides_are_one_line(run, capsys, args, words):
    assert main(["eval", f"run={run}", *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0]


def test_offline_without_data_dir_is_one_line():
    with pytest.raises(PtuneError, match=r"the hub's GEM/e2e_nlg \(test\) cannot be loaded .* e2e/\{train,dev,test\}.csv"):
        tasks.build("e2e", data_dir=None).rows("test")

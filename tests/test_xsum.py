"""The xsum task: local splits, document truncation, and tiny-model train + eval (seq2seq and causal)."""
import json

import pytest

from ptune import tasks
from ptune.cli import main
from ptune.errors import PtuneError
from ptune.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2", "")  # what the tiny models borrow


def test_local_splits_cut_the_test_file_by_position(data_dir):
    task = tasks.build("xsum", data_dir=str(data_dir))
    rows = {s: task.rows(s) for s in ("train", "dev", "test")}
    assert [len(rows[s]) for s in ("train", "dev", "test")] == [800, 100, 100]
    lines = [json.loads(line) for line in (data_dir / "xsum" / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows["train"] + rows["dev"] + rows["test"]] == [str(r["id"]) for r in lines]
    small = tasks.build("xsum", data_dir=str(data_dir), local_dev_size=10, local_test_size=20)
    assert [len(small.rows(s)) for s in ("train", "dev", "test")] == [970, 10, 20]
    with pytest.raises(PtuneError, match="too few"):
        tasks.build("xsum", data_dir=str(data_dir), local_dev_size=600, local_test_size=400).rows("dev")
    with pytest.raises(PtuneError, match="no split 'validation'"):
        task.rows("validation")
    with pytest.raises(PtuneError, match="the hub's EdinburghNLP/xsum .* cannot be loaded"):  # offline, no data_dir
        tasks.build("xsum", data_dir=None).rows("train")


def test_documents_keep_their_start_and_the_template_cue(tok, data_dir):
    task = tasks.build("xsum", data_dir=str(data_dir), max_source_length=32)
    doc = task.rows("dev")[0]["document"]
    cue = tok(" TL;DR:", add_special_tokens=False).input_ids
    [ids] = task.sources(tok, [doc], "causal")
    doc_ids = tok(doc, add_special_tokens=False).input_ids
    assert len(doc_ids) > 32 and 32 <= len(ids) <= 32 + len(cue) + 8
    assert ids[:20] == doc_ids[:20]  # the article's start, not its end
    assert ids[-len(cue):] == cue
    [short] = task.sources(tok, ["A short text."], "causal")
    assert short == tok("A short text. TL;DR:", add_special_tokens=False).input_ids
    # seq2seq: the tokenizer's own special tokens (none for the borrowed tokenizer) around the same text
    assert task.sources(tok, [doc], "seq2seq") == [ids]


def test_training_examples_take_the_loss_on_the_summary_only(tok, data_dir):
    task = tasks.build("xsum", data_dir=str(data_dir), max_train_samples=3, max_source_length=24, max_target_len=6)
    causal = task.train_examples(tok, "causal")
    assert len(causal) == 3
    for e in causal:
        target = [t for t in e.labels if t != -100]
        assert target[-1] == tok.eos_token_id and len(target) <= 7
        assert e.input_ids[-len(target):] == target
    seq = task.train_examples(tok, "seq2seq")
    assert all(e.layout == "seq2seq" and e.labels[-1] == tok.eos_token_id for e in seq)
    with pytest.raises(PtuneError, match="generates text"):
        task.train_examples(tok, "masked")


@pytest.mark.parametrize("bad, words", [
    ({"decoding": "sample"}, "task.decoding='sample' is invalid: choose one of greedy, beam"),
    ({"decoding": "beam", "num_beams": 1}, "task.num_beams=1 is invalid with task.decoding=beam"),
    ({"metrics": ["bleu"]}, "choose from rouge1, rouge2, rougeL"),
    ({"source_template": "{text} TL;DR:"}, "must hold {document} once"),
    ({"max_source_length": 0}, "task.max_source_length=0 is invalid"),
])
def test_bad_values(bad, words):
    with pytest.raises(PtuneError) as e:
        tasks.build("xsum", **bad)
    assert words in str(e.value)


SMALL = ["task=xsum", "task.max_train_samples=16", "task.max_eval_samples=4", "task.max_source_length=48",
         "task.max_new_tokens=8", "trainer.batch_size=4", "trainer.max_steps=2", "trainer.eval_every=2",
         "trainer.save_every=2", "trainer.log_every=1", "trainer.eval_batch_size=4"]


@pytest.mark.parametrize("model, method", [("tiny-t5", "prefix"), ("tiny-llama", "prompt")])
def test_tiny_train_then_eval_writes_rouge(in_tmp, data_dir, capsys, model, method):
    assert main(["train", f"model={model}", f"method={method}", *SMALL]) == 0
    [run] = sorted(p for p in (in_tmp / "outputs").glob("*/*") if p.is_dir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "xsum" and summary["model"] == model and summary["steps"] == 2
    assert list(summary["eval"]) == ["rouge1", "rouge2", "rougeL"]
    assert all(0.0 <= v <= 1.0 for v in summary["eval"].values())
    assert summary["metric_for_best"] == "rouge2"
    preds = [json.loads(line) for line in (run / "predictions/dev.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all({"id", "prediction", "references"} <= set(p) for p in preds)
    assert all("\n" not in p["prediction"] for p in preds)
    # ptune eval on the finished run reproduces its summary
    assert main(["eval", f"run={run}"]) == 0
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == summary["eval"]
    if model == "tiny-llama":  # ptune predict on a file of articles
        (in_tmp / "docs.jsonl").write_text(json.dumps({"document": "The council approved a new park."}) + "\n")
        assert main(["predict", f"run={run}", "input=docs.jsonl"]) == 0
        [row] = [json.loads(line) for line in (in_tmp / "docs.predictions.jsonl").read_text().splitlines()]
        assert isinstance(row["prediction"], str) and "\n" not in row["prediction"]
        (in_tmp / "bad.jsonl").write_text(json.dumps({"text": "no document field"}) + "\n")
        assert main(["predict", f"run={run}", "input=bad.jsonl"]) == 2
        assert "needs a 'document' field" in capsys.readouterr().err
    if model == "tiny-t5":  # beam search and the held-out test articles
        capsys.readouterr()
        assert main(["eval", f"run={run}", "split=test", "task.decoding=beam", "task.num_beams=2"]) == 0
        out = json.loads((run / "eval_test.json").read_text())
        assert out["examples"] == 4 and out["overrides"] == {"task.decoding": "beam", "task.num_beams": 2}
        assert set(out["metrics"]) == {"rouge1", "rouge2", "rougeL"}
        test_ids = {r["id"] for r in tasks.build("xsum", data_dir=str(data_dir)).rows("test")}
        assert {json.loads(line)["id"] for line in (run / "predictions/test.jsonl").read_text().splitlines()} <= test_ids


def test_a_bad_local_file_is_one_line(tmp_path):
    (tmp_path / "xsum").mkdir()
    path = tmp_path / "xsum" / "test.jsonl"
    path.write_text(json.dumps({"document": "An article.", "summary": "A summary.", "id": 1}) + "\n{not json\n")
    with pytest.raises(PtuneError, match=r"line 2: not valid JSON"):
        tasks.build("xsum", data_dir=str(tmp_path)).rows("train")
    path.write_text(json.dumps({"document": "An article.", "summary": ""}) + "\n")
    with pytest.raises(PtuneError, match=r"line 1: needs non-empty text fields document and summary"):
        tasks.build("xsum", data_dir=str(tmp_path)).rows("train")

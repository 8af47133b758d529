"""Tasks sst2 (verbalizer), cb, rte, boolq, lama and custom: metrics on hand-made inputs, a tiny-model
train + eval per task through the CLI (summary.json names the task's metrics; `ptune eval`
reproduces them), and every bad input as one line."""

import json

import pytest

from ptune import tasks
from ptune.cli import main
from ptune.errors import PtuneError
from ptune.tasks.classification import accuracy, macro_f1
from ptune.tasks.lama import manual_template, precision_at_1

FAST = ["trainer.batch_size=4", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2",
        "trainer.log_every=1", "trainer.eval_batch_size=8", "task.max_train_samples=16", "task.max_eval_samples=8"]


# -- metrics on hand-made inputs -------------------------------------------------------------------
def test_accuracy_macro_f1_and_p_at_1_known_values():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    # class 0: P=1/2, R=1 -> 2/3; class 1: P=1, R=1/2 -> 2/3; class 2: 1 -> mean 7/9
    assert macro_f1([0, 0, 1, 2], [0, 1, 1, 2]) == pytest.approx(7 / 9)
    assert macro_f1([0, 0, 0], [0, 0, 0]) == 1.0  # classes absent from both are left out (scikit-learn)
    assert macro_f1([1, 1], [0, 0]) == 0.0
    assert macro_f1([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.5)
    assert precision_at_1([5, 7, 9, 9], [5, 7, 1, 2]) == 0.5
    assert precision_at_1([12, 1], [1, 12]) == 0.0  # ids compared whole, not as digits
    with pytest.raises(ValueError):
        precision_at_1([], [])
    assert manual_template("[X] was born in [Y] .") == "{sub} was born in {mask} ."


# -- data of each task -----------------------------------------------------------------------------
def test_superglue_rows_and_labels(data_dir):
    cb, rte = tasks.build("cb", data_dir=str(data_dir)), tasks.build("rte", data_dir=str(data_dir))
    assert len(cb.rows("train")) == 250 and len(cb.rows("dev")) == 56
    assert len(rte.rows("train")) == 2490 and len(rte.rows("dev")) == 277
    assert cb.rows("train")[0]["label"] == 0 and cb.labels[0] == "entailment"  # "entailment" in the file
    assert {r["label"] for r in cb.rows("dev")} == {0, 1, 2}
    assert cb.metrics == ("accuracy", "macro_f1")


def write_boolq(root):
    folder = root / "superglue" / "boolq"
    folder.mkdir(parents=True)
    facts = [("is the sky blue", "The sky is blue on a clear day.", 1), ("is fire cold", "Fire is hot.", 0),
             ("do cats bark", "Cats meow; dogs bark.", 0), ("is water wet", "Water makes things wet.", 1)]
    for name, n in (("train.jsonl", 4), ("val.jsonl", 2)):
        rows = [{"question": q, "passage": p, "label": y, "idx": i} for i, (q, p, y) in enumerate(facts * n)]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def summary_of(root):
    [run] = [p for p in (root / "outputs").glob("*/*") if (p / "summary.json").exists()]
    return run, json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("task, overrides, metrics", [
    ("sst2", ["model=tiny-bert", "method=fine-tune", "task.head=verbalizer"], {"accuracy"}),
    ("cb", ["model=tiny-llama", "method=prompt", "method.num_virtual_tokens=3", "task.head=verbalizer"],
     {"accuracy", "macro_f1"}),
    ("rte", ["model=tiny-t5", "method=prompt", "method.num_virtual_tokens=3", "task.head=verbalizer"], {"accuracy"}),
    ("boolq", ["model=tiny-bert", "method=p-tuning-v2", "method.num_virtual_tokens=3"], {"accuracy"}),
])
def test_train_then_eval_reproduces_the_summary(in_tmp, data_dir, task, overrides, metrics):
    extra = [f"task.data_dir={write_boolq(in_tmp / 'data')}"] if task == "boolq" else []
    assert main(["train", f"task={task}", *overrides, *FAST, *extra]) == 0
    run, summary = summary_of(in_tmp)
    assert summary["task"] == task and set(summary["eval"]) == metrics
    assert main(["eval", f"run={run}"]) == 0
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == summary["eval"]
    if task == "sst2":  # predict on new rows through the same template and words
        rows = in_tmp / "rows.jsonl"
        rows.write_text(json.dumps({"sentence": "a triumph"}) + "\n" + json.dumps({"sentence": "a mess"}) + "\n")
        assert main(["predict", f"run={run}", f"input={rows}", f"output={in_tmp / 'p.jsonl'}"]) == 0
        preds = [json.loads(line)["prediction"] for line in (in_tmp / "p.jsonl").read_text().splitlines()]
        assert len(preds) == 2 and set(preds) <= {"negative", "positive"}


def test_lama_manual_and_learned_templates(in_tmp, data_dir):
    lama = ["task=lama", "task.relations=[P19,P1001]", "model=tiny-bert", *FAST]
    assert main(["train", *lama, "method=hard-prompt"]) == 0
    run, summary = summary_of(in_tmp)
    ev = summary["eval"]
    assert {"p@1", "p@1/P19", "p@1/P1001", "n_facts", "n_dropped"} <= set(ev) and ev["n_facts"] == 8
    assert ev["p@1"] == pytest.approx((ev["p@1/P19"] + ev["p@1/P1001"]) / 2)  # macro over relations
    records = [json.loads(line) for line in (run / "predictions/dev.jsonl").read_text().splitlines()]
    assert any(r["text"].endswith("was born in [MASK] .") for r in records)
    assert main(["eval", f"run={run}"]) == 0
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == ev
    rows = in_tmp / "facts.jsonl"  # new facts: a subject and the relation's LAMA template per row
    rows.write_text(json.dumps({"sub": "Dante", "template": "[X] was born in [Y] ."}) + "\n")
    assert main(["predict", f"run={run}", f"input={rows}", f"output={in_tmp / 'p.jsonl'}"]) == 0
    [pred] = [json.loads(line) for line in (in_tmp / "p.jsonl").read_text().splitlines()]
    assert pred["sub"] == "Dante" and isinstance(pred["prediction"], str) and pred["prediction"]
    # P-tuning's learned template: 3 + 3 prompt vectors around the subject
    assert main(["train", *lama, "method=p-tuning", "method.num_virtual_tokens=6", "method.encoder=mlp",
                 "task.template='{soft:3} {sub} {soft:3} {mask} .'", "output_dir=outputs2"]) == 0
    [run2] = [p for p in (in_tmp / "outputs2").glob("*/*") if (p / "summary.json").exists()]
    assert json.loads((run2 / "summary.json").read_text())["eval"]["n_facts"] == 8
    # a causal model reads the next token after "X was born in" / "The capital of X is"
    assert main(["train", "task=lama", "task.relations=[P19,P36]", "model=tiny-llama", "method=hard-prompt",
                 *FAST, "output_dir=outputs3"]) == 0
    [run3] = [p for p in (in_tmp / "outputs3").glob("*/*") if (p / "summary.json").exists()]
    ev = json.loads((run3 / "summary.json").read_text())["eval"]
    assert ev["n_relations_skipped"] == 0 and ev["n_dropped"] > 0 and "p@1/P19" in ev


def test_lama_drops_multi_token_objects_and_says_how_many(data_dir):
    from ptune.models import load_tokenizer

    task = tasks.build("lama", data_dir=str(data_dir), relations=["P19"])
    facts = task.facts("dev")
    # AutoPrompt's splits keep only objects that are one token of BERT's (uncased) vocabulary
    task._kind, tok = "masked", load_tokenizer("minilm", "")
    kept, objects, dropped, _ = task._usable(tok, facts)
    assert len(kept) == len(facts) == 200 and dropped == 0
    assert objects[0] == tok.convert_tokens_to_ids(kept[0]["obj"].lower())
    # SmolLM2's byte-level BPE splits some of those cities: dropped and counted
    task._kind, tok = "causal", load_tokenizer("smollm2", "")
    kept, objects, dropped, _ = task._usable(tok, facts)
    assert len(kept) + dropped == 200 and 0 < dropped < 200
    assert all(tok(" " + r["obj"], add_special_tokens=False).input_ids == [o] for r, o in zip(kept, objects))
    # relations.jsonl's one template with the subject after the object (P1923) cannot be read left to right
    odd = {"sub": "Brazil", "obj": "Paris", "relation": "P1923", "template": "[Y] participated in the [X] ."}
    kept, _, dropped, skipped = task._usable(tok, [*facts[:3], odd])
    assert (len(kept), skipped) == (3 - dropped, 1)


@pytest.mark.parametrize("name", ["sst2", "cb", "lama"])
def test_without_data_dir_the_hub_is_asked_and_offline_is_one_line(name):
    task = tasks.build(name, data_dir=None)  # data_dir None: the hub (offline in the tests)
    with pytest.raises(PtuneError, match=f"task {name}: the hub's .* cannot be loaded .*set task.data_dir"):
        task.rows("dev") if name != "lama" else task.facts("test")


# -- custom data -------------------------------------------------------------------------------------
REVIEWS = [("great food and friendly staff", "food"), ("the waiter was rude", "service"),
           ("tasty pasta", "food"), ("we waited an hour for a table", "service"),
           ("cheap and delicious", "price"), ("way too expensive", "price")]


def write_csv(path, rows, header="review,category", sep=","):
    path.write_text(header + "\n" + "".join(f"{a}{sep}{b}\n" for a, b in rows))
    return path


def test_custom_csv_one_command_then_eval(in_tmp):
    train = write_csv(in_tmp / "reviews.csv", REVIEWS * 3)
    dev = write_csv(in_tmp / "dev.csv", REVIEWS)
    cmd = ["train", "task=custom", f"task.train_file={train}", f"task.eval_file={dev}", "task.text_column=review",
           "task.label_column=category", "model=minilm", "method=prompt", "method.num_virtual_tokens=4", *FAST]
    assert main(cmd) == 0
    run, summary = summary_of(in_tmp)
    assert set(summary["eval"]) == {"accuracy", "macro_f1"}
    config = json.loads((run / "adapter/adapter_config.json").read_text())
    assert config["head"]["labels"] == ["food", "price", "service"]  # read from the data, sorted
    assert main(["eval", f"run={run}"]) == 0
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == summary["eval"]


def test_custom_generation_jsonl(in_tmp):
    rows = [{"question": f"what is {a} plus {b}", "answer": str(a + b)} for a in range(4) for b in range(4)]
    path = in_tmp / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "task=custom", "task.type=generation", f"task.train_file={path}", f"task.eval_file={path}",
                 "task.text_column=question", "task.label_column=answer", "task.max_new_tokens=4",
                 "model=tiny-gpt2", "method=prompt", "method.num_virtual_tokens=3", *FAST]) == 0
    run, summary = summary_of(in_tmp)
    assert set(summary["eval"]) == {"exact_match", "rouge_l"}
    assert main(["eval", f"run={run}"]) == 0
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == summary["eval"]


# -- bad input: one line each --------------------------------------------------------------------------
def one_line_error(capsys, args) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_templates_and_verbalizers_are_one_line(in_tmp, data_dir, capsys):
    sst2 = ["train", "task=sst2", "task.head=verbalizer", *FAST]
    cases = [
        (["model=tiny-bert", "method=prompt", "task.template='{sentence}'"], "has no {mask}, which task.head=verbalizer needs"),
        (["model=tiny-bert", "method=prompt", "~task.verbalizer.positive=great"], "no word for the label 'positive'"),
        (["model=tiny-bert", "method=prompt", "+task.verbalizer.neutral=meh"],
         "names the label 'neutral'"),
        (["model=tiny-bert", "method=prompt", "task.verbalizer.positive='🦜'"], "cannot be represented"),
        (["model=minilm", "method=prompt"], "without an LM head"),
        (["model=tiny-llama", "method=prompt", "task.template='{mask} : {sentence}'"], "move {mask} to the end"),
        (["model=tiny-bert", "method=p-tuning", "method.num_virtual_tokens=5",
          "task.template='{soft:2} {sentence} It was {mask} .'"], "set method.num_virtual_tokens=2"),
        (["model=tiny-bert", "method=prompt", "task.template='{review} {mask}'"], "names the field 'review'"),
    ]
    for overrides, words in cases:
        assert words in one_line_error(capsys, [*sst2, *overrides]), overrides


def test_bad_custom_files_are_one_line(in_tmp, capsys):
    good = write_csv(in_tmp / "good.csv", REVIEWS)
    base = ["train", "task=custom", "task.text_column=review", "task.label_column=category", "model=tiny-bert",
            "method=prompt", *FAST]
    bad_json = in_tmp / "bad.jsonl"
    bad_json.write_text('{"review": "ok", "category": "food"}\n{"review": "oops", \n')
    empty = write_csv(in_tmp / "empty.csv", [*REVIEWS, ("", "food")])
    tabbed = write_csv(in_tmp / "tabbed.csv", REVIEWS, header="review\tcategory", sep="\t")
    unseen = write_csv(in_tmp / "unseen.csv", [*REVIEWS, ("free dessert", "extras")])
    cases = [
        ([f"task.train_file={in_tmp / 'missing.csv'}", f"task.eval_file={good}"], "no such file"),
        ([f"task.train_file={good}", f"task.eval_file={good}", "task.label_column=topic"],
         "no column 'topic' (it has review, category); set task.text_column"),
        ([f"task.train_file={bad_json}", f"task.eval_file={good}"], "line 2: not valid JSON"),
        ([f"task.train_file={tabbed}", f"task.eval_file={good}"], "tab-separated"),
        ([f"task.train_file={empty}", f"task.eval_file={good}"], "empty 'review'"),
        ([f"task.train_file={good}", f"task.eval_file={unseen}"], "label 'extras', which is not one of"),
        ([f"task.train_file={good}", f"task.eval_file={good}", "task.head=verbalizer",
          "task.template='{review} It was about {mask} .'", "task.verbalizer={food: food, price: price}"],
         "no word for the label 'service'"),
        ([f"task.train_file={good}", f"task.eval_file={good}", "task.type=regression"], "task.type='regression'"),
    ]
    for overrides, words in cases:
        assert words in one_line_error(capsys, [*base, *overrides]), overrides
    assert not (in_tmp / "outputs").exists() or not any((in_tmp / "outputs").rglob("summary.json"))


def test_classification_refuses_the_lm_head():
    with pytest.raises(PtuneError, match="task.head=lm generates text; task sst2 classifies"):
        tasks.build("sst2", head="lm")

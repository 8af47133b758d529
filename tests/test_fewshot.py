"""The few-shot protocol (ptune.tasks.fewshot, task.few_shot), the report's aggregation over seeds, and
the label-word search (ptune.search.label_words) with what every search shares (ptune.search.base)."""

import json
import math
import random
import shlex

import numpy as np
import pytest
import torch

from conftest import crash_after_search_save
from ptune import cli, tasks
from ptune.tasks import fewshot
from ptune.config import compose, override_value
from ptune.errors import PtuneError
from ptune.search import base, label_words
from ptune.train import report

FS = ["task=sst2", "task.head=verbalizer", "task.few_shot=4", "trainer.batch_size=4", "trainer.eval_batch_size=8"]


def rows_of(labels):
    return [{"text": f"row {i}", "label": y} for i, y in enumerate(labels)]


# -- the sampler ---------------------------------------------------------------------------------
def test_split_is_lm_bffs_procedure_stratified_and_disjoint():
    rng = random.Random(0)
    rows = rows_of([rng.randrange(3) for _ in range(200)])
    train, dev = fewshot.split(rows, 3, 5, seed=21)
    # their tools/generate_k_shot_data.py: np.random.seed(seed); np.random.shuffle(lines); first K per
    # label to train, the next K per label to dev
    np.random.seed(21)
    lines = list(rows)
    np.random.shuffle(lines)
    ref_train, ref_dev, count = [], [], [0, 0, 0]
    for r in lines:
        if count[r["label"]] < 5:
            ref_train.append(r)
        elif count[r["label"]] < 10:
            ref_dev.append(r)
        else:
            continue
        count[r["label"]] += 1
    assert train == ref_train and dev == ref_dev
    assert sorted(r["label"] for r in train) == [0] * 5 + [1] * 5 + [2] * 5
    assert sorted(r["label"] for r in dev) == [0] * 5 + [1] * 5 + [2] * 5
    assert not {r["text"] for r in train} & {r["text"] for r in dev}


def test_split_is_deterministic_and_differs_by_seed():
    rows = rows_of([i % 2 for i in range(100)])
    assert fewshot.split(rows, 2, 4, 13) == fewshot.split(rows, 2, 4, 13)
    assert fewshot.split(rows, 2, 4, 13)[0] != fewshot.split(rows, 2, 4, 42)[0]


def test_a_class_without_2k_rows_is_one_line():
    rows = rows_of([0] * 20 + [1] * 7)
    with pytest.raises(PtuneError, match="needs 8 training rows of class 'b'.*has 7"):
        fewshot.split(rows, 2, 4, 13, labels=("a", "b"))


# -- the task's splits -----------------------------------------------------------------------------
def sst2(**kw):
    return tasks.build("sst2", **{"head": "verbalizer", **kw})


def test_task_splits_under_the_protocol():
    t = sst2(few_shot=4, few_shot_seed=13)
    train, dev, test = t.rows("train"), t.rows("dev"), t.rows("test")
    assert [sum(r["label"] == c for r in train) for c in (0, 1)] == [4, 4]
    assert [sum(r["label"] == c for r in dev) for c in (0, 1)] == [4, 4]
    assert not {r["sentence"] for r in train} & {r["sentence"] for r in dev}
    full = sst2().rows("dev")
    assert test == full and len(test) == 872  # the dataset's dev split is the reported test
    assert train == fewshot.split(sst2().rows("train"), 2, 4, 13)[0]


@pytest.mark.parametrize("kw, msg", [
    ({"few_shot": 0}, "task.few_shot=0 is invalid"),
    ({"few_shot": True}, "task.few_shot=True is invalid"),
    ({"few_shot": "8"}, "task.few_shot='8' is invalid"),
    ({"few_shot": 4, "few_shot_seed": 1.5}, "task.few_shot_seed=1.5 is invalid"),
    ({"few_shot": 4, "max_train_samples": 10}, "both choose the training rows"),
])
def test_bad_few_shot_keys(kw, msg):
    with pytest.raises(PtuneError, match=msg):
        sst2(**kw)


def test_test_split_needs_the_protocol_and_other_splits_are_refused():
    with pytest.raises(PtuneError, match="split=test is the reported split of the few-shot protocol"):
        sst2().rows("test")
    with pytest.raises(PtuneError, match="has splits train, dev .* and test .*not 'val'"):
        sst2(few_shot=4).rows("val")


def test_generation_refuses_few_shot(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text('{"text": "a", "label": "b"}\n')
    with pytest.raises(PtuneError, match="task.type=generation has no classes"):
        tasks.build("custom", type="generation", train_file=str(f), eval_file=str(f), few_shot=2)


def test_custom_classification_takes_the_protocol(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": "xy"[i % 2]}) + "\n" for i in range(20)))
    t = tasks.build("custom", train_file=str(f), eval_file=str(f), few_shot=3, few_shot_seed=21)
    assert len(t.rows("train")) == 6 and len(t.rows("dev")) == 6 and len(t.rows("test")) == 20


def test_cli_rejects_a_bad_value_in_one_line(in_tmp, capsys):
    code = cli.main(["train", "model=tiny-bert", *FS[:2], "task.few_shot=-2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "task.few_shot=-2 is invalid" in err[0]
    assert not (in_tmp / "outputs").exists()


# -- training under the protocol ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fs_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fs")
    code = cli.main(["train", "model=tiny-bert", "method=prompt", *FS, "trainer.max_steps=4", "trainer.eval_every=2",
                     "task.max_eval_samples=20", f"output_dir={out}"])
    assert code == 0
    [run] = list(out.glob("*/*"))
    return run


def test_a_run_is_scored_on_test_with_the_dev_selected_adapter(fs_run, capsys):
    s = json.loads((fs_run / "summary.json").read_text())
    assert s["test"]["adapter"] == "adapter_best" and s["test"]["split"] == "test" and s["test"]["examples"] == 20
    assert json.loads((fs_run / "eval_test.json").read_text()) == s["test"]
    records = [json.loads(x) for x in (fs_run / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(records) == 20
    assert s["test"]["metrics"]["accuracy"] == sum(r["label"] == r["prediction"] for r in records) / 20
    # evaluating the same adapter on test through `ptune eval` gives the same number
    assert cli.main(["eval", f"run={fs_run}", "split=test", "adapter=adapter_best"]) == 0
    assert json.loads((fs_run / "eval_test.json").read_text())["metrics"] == s["test"]["metrics"]


def test_the_headline_shows_test():
    line = cli.headline({"run_dir": "r", "summary": {"task": "sst2", "metric_for_best": "accuracy",
                                                     "eval": {"accuracy": 0.5}, "final_train_loss": 1.0,
                                                     "test": {"metrics": {"accuracy": 0.625}, "adapter": "adapter_best",
                                                              "examples": 8}}})
    assert "sst2 test accuracy: 0.6250  (adapter_best, 8 examples)" in line


# -- the report over seeds -------------------------------------------------------------------------------
def fake_job(i, overrides, test, dev):
    return report.Job(i, overrides, None, summary={"metric_for_best": "accuracy", "eval": {"accuracy": dev},
                                                   "best": {"metrics": {"accuracy": dev}, "step": 1},
                                                   "test": {"metrics": {"accuracy": test}}})


def test_settings_mean_and_std_by_hand():
    jobs = [fake_job(0, {"m": "a", "task.few_shot_seed": "13"}, 0.5, 0.6),
            fake_job(1, {"m": "a", "task.few_shot_seed": "21"}, 0.7, 0.8),
            fake_job(2, {"m": "b", "task.few_shot_seed": "13"}, 0.9, 0.9),
            fake_job(3, {"m": "b", "task.few_shot_seed": "21"}, 0.9, 0.7)]
    assert report.seed_keys(jobs) == ["task.few_shot_seed"]
    assert report.choose_axes(jobs) == ("m", [])
    groups = report.settings(jobs)
    assert [g.overrides for g in groups] == [{"m": "a"}, {"m": "b"}]
    mean, std, n = groups[0].stat("test", "accuracy")
    assert (round(mean, 10), round(std, 10), n) == (0.6, 0.1, 2)  # population std of 0.5, 0.7
    assert groups[1].stat("metric", "accuracy")[:2] == pytest.approx((0.8, 0.1))
    lines = report.seed_table(jobs, "accuracy")
    assert lines[2] == "| a | 2 / 2 | 0.6000 ± 0.1000 | 0.7000 ± 0.1000 | 0.7000 ± 0.1000 |"


def test_a_failed_seed_is_left_out_of_the_mean():
    jobs = [fake_job(0, {"trainer.seed": "1"}, 0.5, 0.5), fake_job(1, {"trainer.seed": "2"}, 0.9, 0.9)]
    jobs[1].error = "boom"
    [g] = report.settings(jobs)
    assert g.stat("test", "accuracy") == (0.5, 0.0, 1)
    assert "| 1 / 2 |" in report.seed_table(jobs, "accuracy")[2]


def test_a_seed_sweep_reports_mean_std_and_error_bars(tmp_path):
    code = cli.main(["train", "-m", "model=tiny-bert", "method=prompt", *FS, "task.few_shot_seed=13,21",
                     "method.num_virtual_tokens=2,4", "trainer.max_steps=2", "task.max_eval_samples=10",
                     f"output_dir={tmp_path}"])
    assert code == 0
    [sweep] = [p for p in tmp_path.glob("*/*") if (p / "summary.csv").exists()]
    text = (sweep / "report.md").read_text()
    assert "Over `task.few_shot_seed`" in text
    jobs = report.load_sweep(sweep)
    for n in ("2", "4"):
        tests = [j.summary["test"]["metrics"]["accuracy"] for j in jobs if j.overrides["method.num_virtual_tokens"] == n]
        mean = sum(tests) / 2
        std = math.sqrt(sum((t - mean) ** 2 for t in tests) / 2)
        assert f"| {n} | 2 / 2 | {mean:.4f} ± {std:.4f} |" in text
    assert (sweep / "report_accuracy.png").read_bytes()[:4] == b"\x89PNG"


# -- what every search shares ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["{sentence} It was {mask} .", 'a "q" b', "back\\slash", "end\\", 'x\\"y', "it's",
                                   "a,b [c] {d:e} = f", ["one", "t w o"], {"neg": ["bad", "not good"], "pos": "ok"}])
def test_hydra_quote_round_trips(value):
    assert override_value("k=" + base.hydra_quote(value)) == value


def test_overrides_line_composes_to_the_found_keys():
    found = {"template": '{sentence} So "it" was {mask} .', "verbalizer": {"negative": ["bad"], "positive": ["good"]}}
    cfg = compose(["task=sst2", *shlex.split(base.overrides_line(found))])
    assert cfg.task.template == found["template"]
    assert dict(cfg.task.verbalizer) == {"negative": ["bad"], "positive": ["good"]}


# -- label-word search -----------------------------------------------------------------------------------
def test_assignment_accuracy_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(12, 9, generator=g)
    y = torch.tensor([0, 1, 2] * 4)
    per_class = [[0, 1, 2, 3], [2, 4, 5], [6, 7, 8, 0]]
    got = label_words.assignment_accuracy(logp, y, per_class, n=5)
    brute = []
    for flat, cols in enumerate((a, b, c) for a in per_class[0] for b in per_class[1] for c in per_class[2]):
        if len(set(cols)) < 3:
            continue
        acc = float((logp[:, list(cols)].argmax(-1) == y).float().mean())
        brute.append((-acc, flat, cols))
    brute.sort()
    assert [(round(a, 6), c) for a, c in got] == [(round(-a, 6), c) for a, _, c in brute[:5]]


def test_whole_words_tokenize_back_to_themselves(backbone_gpt2):
    tok = backbone_gpt2.tokenizer
    words = label_words.whole_words(tok, " ")
    assert len(words) > 100
    for w, tid in words[:200]:
        assert w.isalpha() and tok(" " + w, add_special_tokens=False).input_ids == [tid]


@pytest.fixture(scope="module")
def backbone_gpt2():
    from ptune.build import build_backbone

    return build_backbone(compose(["model=tiny-gpt2"]))


SEARCH = ["model=tiny-gpt2", "task=sst2", "task.few_shot=4", "search.k=6", "search.n=5"]


@pytest.fixture(scope="module")
def lw_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("lw")
    assert cli.main(["search", "label-words", *SEARCH, f"output_dir={out}"]) == 0
    [sdir] = list(out.glob("*/*"))
    return sdir


def test_label_word_search_writes_what_it_found(lw_search):
    cands = [json.loads(x) for x in (lw_search / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 5 and all({"words", "train_accuracy", "dev_accuracy"} <= set(c) for c in cands)
    train_acc = [c["train_accuracy"] for c in cands]
    assert train_acc == sorted(train_acc, reverse=True)  # the n best by the training ranking, best first
    summary = json.loads((lw_search / "summary.json").read_text())
    best = max(cands, key=lambda c: (c["dev_accuracy"], c["train_accuracy"]))
    assert summary["best"]["accuracy"] == best["dev_accuracy"]
    assert summary["found"]["verbalizer"] == {"negative": [best["words"][0]], "positive": [best["words"][1]]}
    assert summary["candidates_scored"] == 5 and summary["few_shot"] == 4
    import yaml

    assert yaml.safe_load((lw_search / "result.yaml").read_text())["task"] == summary["found"]


def test_found_words_are_the_best_assignment_by_hand(lw_search):
    """Re-score the winner zero-shot on the few-shot dev rows independently of the search."""
    from ptune.build import build

    found = json.loads((lw_search / "summary.json").read_text())["found"]
    cfg = compose(["model=tiny-gpt2", "task=sst2", "task.few_shot=4", "method=hard-prompt",
                   *shlex.split((lw_search / "overrides.txt").read_text())])
    assert dict(cfg.task.verbalizer) == found["verbalizer"]
    _, method, task = build(cfg)
    rows = task.rows("dev")
    preds = task.classify(method, rows, 8)
    acc = sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert acc == json.loads((lw_search / "summary.json").read_text())["best"]["accuracy"]


@pytest.mark.parametrize("method", ["prompt", "p-tuning", "fine-tune"])
def test_the_overrides_train(lw_search, tmp_path, method):
    """Searched label words compose with the methods (the table's P-tuning / PET rows)."""
    args = shlex.split((lw_search / "overrides.txt").read_text())
    assert cli.main(["train", "model=tiny-gpt2", "task=sst2", "task.few_shot=4", f"method={method}", *args,
                     "trainer.max_steps=2", "trainer.batch_size=4", "task.max_eval_samples=8",
                     f"output_dir={tmp_path}"]) == 0


def test_a_resumed_search_equals_an_uninterrupted_one(lw_search, tmp_path, monkeypatch):
    restore = crash_after_search_save(monkeypatch, 2)  # after the training-set ranking, before the dev scores
    assert cli.main(["search", "label-words", *SEARCH, f"output_dir={tmp_path}"]) == 130
    restore()
    [sdir] = list(tmp_path.glob("*/*"))
    assert not (sdir / "result.yaml").exists()
    assert cli.main(["search", f"resume={sdir}"]) == 0
    for name in ("candidates.jsonl", "result.yaml", "overrides.txt"):
        assert (sdir / name).read_text() == (lw_search / name).read_text()


def test_a_words_file_scores_multi_token_words(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# candidates\ngreat\nterrible\nunbelievably wonderful\nhorrendously\n")
    assert cli.main(["search", "label-words", *SEARCH, "search.k=2", "search.n=2", f"search.words={words}",
                     f"output_dir={tmp_path}/out"]) == 0
    [sdir] = list((tmp_path / "out").glob("*/*"))
    found = json.loads((sdir / "summary.json").read_text())["found"]["verbalizer"]
    assert {w for ws in found.values() for w in ws} <= {"great", "terrible", "unbelievably wonderful", "horrendously"}


@pytest.mark.parametrize("args, msg", [
    (["label-words", "model=tiny-gpt2", "task=sst2"], "set task.few_shot=K"),
    (["label-words", *SEARCH, "method=prompt"], "drop method=prompt"),
    (["label-words", *SEARCH, "task.head=linear"], "drop task.head=linear"),
    (["label-words", *SEARCH, "search.k=0"], "search.k=0 is invalid"),
    (["label-words", *SEARCH, "search.bogus=1"], "unknown key 'search.bogus'"),
    (["label-words", *SEARCH, "search.words=/no/such/file"], "search.words=/no/such/file: no such file"),
    (["nonsense", *SEARCH], "unknown search 'nonsense'"),
    ([], "needs the kind of search first"),
    (["resume=/no/such/dir"], "not a ptune search directory"),
])
def test_search_refusals_are_one_line(args, msg, in_tmp, capsys):
    code = cli.main(["search", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and msg in err[0], err
    assert not (in_tmp / "outputs").exists() or not any((in_tmp / "outputs").rglob("result.yaml"))


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-t5", "tiny-bart", "tiny-llama"])
def test_label_word_search_on_every_backbone_kind(model, tmp_path):
    """Masked, seq2seq (decoder's first piece) and causal backbones: the found words are single
    whole-word tokens of that tokenizer, and the found verbalizer trains."""
    assert cli.main(["search", "label-words", f"model={model}", "task=sst2", "task.few_shot=4", "search.k=4",
                     "search.n=3", f"output_dir={tmp_path}/s"]) == 0
    [sdir] = list((tmp_path / "s").glob("*/*"))
    found = json.loads((sdir / "summary.json").read_text())["found"]["verbalizer"]
    assert set(found) == {"negative", "positive"} and all(len(ws) == 1 for ws in found.values())
    assert cli.main(["train", f"model={model}", "task=sst2", "task.few_shot=4", "method=prompt",
                     *shlex.split((sdir / "overrides.txt").read_text()), "trainer.max_steps=1", "trainer.batch_size=4",
                     "task.max_eval_samples=4", f"output_dir={tmp_path}/t"]) == 0


def test_a_search_refused_after_loading_leaves_no_directory(tmp_path, capsys):
    """A custom task's fields are known only once it is built: a placement it cannot take is refused
    after the search directory exists, and that directory is removed again."""
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": "xy"[i % 2]}) + "\n" for i in range(20)))
    code = cli.main(["search", "template", "model=tiny-t5", "task=custom", f"task.train_file={f}", f"task.eval_file={f}",
                     "task.few_shot=2", "task.template='{text} It was {mask} .'", "search.placements=[between]",
                     f"output_dir={tmp_path}/out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "between" in err[0]
    assert not any(p.is_dir() for p in (tmp_path / "out").glob("*/*"))


@pytest.mark.parametrize("command", [["eval"], ["predict", "input={rows}"], ["export", "out={tmp}/o"], ["train"]])
def test_a_search_directory_is_not_a_run(lw_search, command, capsys, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"sentence": "fine"}\n')
    args = [command[0], f"{'resume' if command[0] == 'train' else 'run'}={lw_search}",
            *[c.format(rows=rows, tmp=tmp_path) for c in command[1:]]]
    before = sorted(p.name for p in lw_search.iterdir())
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a prompt search (ptune search label-words), not a training run" in err[0], err
    assert sorted(p.name for p in lw_search.iterdir()) == before


def test_the_results_table_script_aggregates_by_hand():
    from conftest import load_script

    t = load_script("fewshot_table")
    results = [{"task": "sst2", "row": "pet", "seed": s, "test": {"accuracy": a}, "search_s": None, "train_s": 10.0,
                "search_cmd": None, "train_cmd": f"ptune train seed={s}"} for s, a in ((13, 0.8), (21, 0.9))]
    results.append({"task": "sst2", "row": "label-words", "seed": 13, "test": {"accuracy": 0.7}, "search_s": 30.0,
                    "train_s": 12.0, "search_cmd": "ptune search label-words", "train_cmd": "ptune train x"})
    text = t.table(results)
    assert f"| {t.ROWS['pet'][0]} | 13,21 | 0.8500 ± 0.0500 | – | 10 |" in text
    assert f"| {t.ROWS['label-words'][0]} | 13 | 0.7000 ± 0.0000 | 30 | 12 |" in text
    assert "`ptune search label-words` then" in text


def test_the_results_table_keeps_each_k_apart_and_rules_rows_need_a_rule_table(tmp_path):
    from conftest import load_script

    t = load_script("fewshot_table")
    row = {"row": "prompt", "test": {"accuracy": 0.5}, "search_s": None, "train_s": 1.0, "search_cmd": None,
           "train_cmd": "ptune train x"}
    text = t.table([{**row, "task": "cb", "k": 8, "seed": 13}, {**row, "task": "cb", "k": 4, "seed": 13,
                                                                 "test": {"accuracy": 0.7}}])
    assert "### cb (K=8," in text and "### cb (K=4," in text  # two tables, not one mean of 0.6
    assert "0.6000" not in text
    with pytest.raises(RuntimeError, match="row prompt-rules needs a rule table for task rte"):
        t.one("rte", "prompt-rules", 13, 16, 30, tmp_path, None, [])


def test_the_results_table_script_passes_k_and_the_rule_table_to_ptune(tmp_path, monkeypatch):
    from conftest import load_script

    t = load_script("fewshot_table")
    seen = []

    def fake_run(cmd, log):  # the command ptune would get; stop before reading a run directory
        seen.append(cmd)
        raise RuntimeError("stop")

    monkeypatch.setattr(t, "run", fake_run)
    with pytest.raises(RuntimeError, match="stop"):
        t.one("cb", "prompt-rules", 21, 8, 30, tmp_path, None, [])
    cmd = seen[0]
    assert "task.few_shot=8" in cmd and "task.few_shot_seed=21" in cmd and "task.head=rules" in cmd
    assert any(c.startswith("task.rules=") for c in cmd) and any(c.startswith("task.slots=") for c in cmd)
    assert not any("{rules}" in c or "{steps}" in c for c in cmd) and "trainer.max_steps=30" in cmd

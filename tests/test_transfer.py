"""Domain transfer (`ptune eval run=... task=<other> label_map=...`) on tiny-bert SST-2 runs."""

import csv
import json

import pytest

from ptune import cli
from ptune.errors import PtuneError
from ptune.infer.transfer import label_groups, parse_label_map

TRAIN = ["task=sst2", "model=tiny-bert", "method=prompt", "method.num_virtual_tokens=2", "task.max_train_samples=16",
         "task.max_eval_samples=12", "trainer.batch_size=4", "trainer.max_steps=2", "trainer.eval_every=2",
         "trainer.save_every=2", "trainer.lr=1e-1"]
FLIP = "label_map=positive:negative,negative:positive"


def _train(out, *extra):
    assert cli.main(["train", *TRAIN, *extra, f"output_dir={out}"]) == 0
    [run] = [p for p in out.glob("*/*") if (p / "adapter").is_dir()]
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A linear-head run and a verbalizer-head run, each with its own plain `ptune eval` on dev."""
    out = {}
    for head in ("linear", "verbalizer"):
        run = _train(tmp_path_factory.mktemp(head), f"task.head={head}")
        assert cli.main(["eval", f"run={run}"]) == 0
        out[head] = run
    return out


def _preds(run, name):
    return [json.loads(line) for line in (run / "predictions" / f"{name}.jsonl").read_text().splitlines()]


def _reviews_csv(run, path):
    """The run's own 12 dev sentences as a custom review set with other label names (good / bad)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "stars"])
        for r in _preds(run, "dev"):
            w.writerow([r["text"].replace(" It was [MASK] .", ""), {"positive": "good", "negative": "bad"}[r["label"]]])
    return path


@pytest.mark.parametrize("head", ["linear", "verbalizer"])
def test_identity_and_permuted_maps(runs, head, capsys):
    run = runs[head]
    plain = json.loads((run / "eval_dev.json").read_text())
    assert cli.main(["eval", f"run={run}", "task=sst2", "task.max_eval_samples=12"]) == 0  # same labels: identity
    same = json.loads((run / "eval_sst2_dev.json").read_text())
    assert same["metrics"] == plain["metrics"] and same["examples"] == 12
    assert _preds(run, "sst2_dev") == _preds(run, "dev")
    assert json.loads((run / "eval_dev.json").read_text()) == plain  # the run's own eval is not overwritten
    assert cli.main(["eval", f"run={run}", "task=sst2", "task.max_eval_samples=12", FLIP]) == 0
    flipped = _preds(run, "sst2_dev")
    other = {"positive": "negative", "negative": "positive"}
    assert [r["prediction"] for r in flipped] == [other[r["prediction"]] for r in _preds(run, "dev")]
    assert json.loads((run / "eval_sst2_dev.json").read_text())["metrics"]["accuracy"] == pytest.approx(
        1 - plain["metrics"]["accuracy"])
    assert "sst2 -> sst2" in capsys.readouterr().out


@pytest.mark.parametrize("head", ["linear", "verbalizer"])
def test_sst2_to_a_custom_review_set(runs, head, tmp_path, capsys):
    run = runs[head]
    reviews = _reviews_csv(run, tmp_path / "reviews.csv")
    task = ["task=custom", f"task.train_file={reviews}", f"task.eval_file={reviews}", "task.text_column=review",
            "task.label_column=stars"]
    if head == "verbalizer":  # the trained words (terrible / great) are read at this template's mask
        task.append("task.template='{review} It was {mask} .'")
    assert cli.main(["eval", f"run={run}", *task]) == 2  # bad/good vs negative/positive: no default map
    err = capsys.readouterr().err
    assert "(negative, positive) differ from the task's (bad, good)" in err and err.count("\n") == 1
    assert cli.main(["eval", f"run={run}", *task, "label_map=positive:good,negative:bad"]) == 0
    got = json.loads((run / "eval_custom-reviews_dev.json").read_text())
    plain = json.loads((run / "eval_dev.json").read_text())
    assert got["metrics"]["accuracy"] == plain["metrics"]["accuracy"] and got["trained_task"] == "sst2"
    rename = {"positive": "good", "negative": "bad"}
    assert [r["prediction"] for r in _preds(run, "custom-reviews_dev")] == \
        [rename[r["prediction"]] for r in _preds(run, "dev")]


def test_many_to_one_and_errors(runs, tmp_path, capsys):
    run = runs["linear"]
    assert cli.main(["eval", f"run={run}", "task=sst2", "task.max_eval_samples=12",
                     "label_map=positive:positive,negative:positive"]) == 0
    out = json.loads((run / "eval_sst2_dev.json").read_text())
    assert out["never_predicted"] == ["negative"]
    assert {r["prediction"] for r in _preds(run, "sst2_dev")} == {"positive"}
    cases = [(["task=sst2", "label_map=great:positive"], "not a label of the run (negative, positive)"),
             (["task=sst2", "label_map=positive:good"], "not a label of the task (negative, positive)"),
             (["task=sst2", "label_map=positive"], "write trained:new pairs"),
             (["task=e2e"], "not a classification task"),
             (["task=sst2", "task.head=verbalizer"], "trained with task.head=linear"),
             (["label_map=positive:positive"], "add task=<task>"),
             (["task=sst2", f"label_map={tmp_path / 'missing.yaml'}"], "no such file")]
    for args, message in cases:
        assert cli.main(["eval", f"run={run}", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


def test_label_map_parsing(tmp_path):
    assert parse_label_map("positive:good, negative:bad") == {"positive": "good", "negative": "bad"}
    (tmp_path / "m.yaml").write_text("positive: good\nnegative: bad\n")
    (tmp_path / "m.json").write_text('{"positive": "good"}')
    assert parse_label_map(str(tmp_path / "m.yaml")) == {"positive": "good", "negative": "bad"}
    assert parse_label_map(str(tmp_path / "m.json")) == {"positive": "good"}
    assert parse_label_map(None) is None
    with pytest.raises(PtuneError, match="twice"):
        parse_label_map("a:b,a:c")
    # per new label, the trained classes that stand for it; identity when the names match in any order
    assert label_groups(None, ["neg", "pos"], ["pos", "neg"]) == [[1], [0]]
    assert label_groups({"c": "x", "n": "x", "e": "y"}, ["e", "c", "n"], ["x", "y", "z"]) == [[1, 2], [0], []]


def test_mapped_linear_head_selects_and_combines_rows():
    import torch

    from ptune.heads.linear import LinearHead
    from ptune.infer.transfer import MappedHead

    head = LinearHead(8, 3, dropout=0.0, seed=1)
    head.bias.data = torch.tensor([0.3, -0.2, 0.1])
    pooled = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))  # (batch, hidden)
    logits = head(pooled)  # (batch, 3)
    assert torch.equal(MappedHead(head, [[2], [0], [1]])(pooled), logits[:, [2, 0, 1]])  # a permutation
    merged = MappedHead(head, [[0, 2], [1], []])(pooled)
    assert torch.allclose(merged[:, 0], torch.logsumexp(logits[:, [0, 2]], -1))
    assert torch.equal(merged[:, 1], logits[:, 1]) and torch.isinf(merged[:, 2]).all()

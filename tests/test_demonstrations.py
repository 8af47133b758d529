"""LM-BFF's in-context demonstrations (ptune/tasks/demonstrations.py): how they are written per
backbone kind, which rows are drawn (never the example itself, deterministic, `similar` from the
most similar half), averaging over demonstration sets, the CLI end to end, and each refusal."""

import json

import pytest
import torch

from ptune import tasks
from ptune.build import build
from ptune.cli import compose, main
from ptune.errors import PtuneError
from ptune.infer.pool import Adapter, Pool
from ptune.tasks import demonstrations as demos

FEW = ["task=sst2", "task.head=verbalizer", "task.few_shot=4", "method=prompt", "method.num_virtual_tokens=2"]


def setup(*overrides, model="tiny-bert"):
    """(backbone, method, task) of an SST-2 few-shot run with demonstrations; later keys win."""
    keys = {o.split("=")[0]: o for o in [*FEW, f"model={model}", "task.demonstrations=random", *overrides]}
    return build(compose(list(keys.values())))


def demo_text(row, word):
    return f"{row['sentence']} It was {word} ."


# -- how demonstrations are written ---------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2", "tiny-t5"])
def test_demonstrations_follow_the_query_except_on_causal_models(data_dir, model):
    backbone, _, task = setup(model=model)
    tok = backbone.tokenizer
    row = task.rows("dev")[0]
    [chosen] = task.demos.choose(task, [row], 0, training=False)
    pool = task.training_rows()
    shown = " ".join(demo_text(pool[i], w) for i, w in zip(chosen, ["terrible", "great"]))
    [e] = task.examples(tok, [row])
    query = f"{row['sentence']} It was"
    if backbone.kind == "causal":  # GPT-3 style: demonstrations, then the query up to {mask}
        assert e.input_ids[:e.mask_pos] == tok(f"{shown} {query}", add_special_tokens=False).input_ids
    else:  # LM-BFF: the query with its mask, then one demonstration per class in class order
        before = tok(query, add_special_tokens=False).input_ids
        after = tok(f" . {shown}", add_special_tokens=False).input_ids  # the query's " ." then the demonstrations
        lead = 1 if backbone.kind == "masked" else 0  # [CLS]
        assert e.input_ids[lead:e.mask_pos] == before
        assert e.input_ids[e.mask_pos + 1:e.mask_pos + 1 + len(after)] == after
        if backbone.kind == "masked":
            assert e.input_ids[e.mask_pos] == tok.mask_token_id and e.input_ids[-1] == tok.sep_token_id


def test_fields_are_cut_longest_first_and_fixed_parts_that_do_not_fit_name_max_len(data_dir):
    backbone, _, task = setup("task.max_len=30")
    tok = backbone.tokenizer
    rows = task.rows("dev")[:8]
    assert all(len(e.input_ids) <= 30 for e in task.examples(tok, rows))
    task.max_len = 12  # [CLS] [SEP], 3 x "It was . " words, the mask and two label words: 14 fixed tokens
    with pytest.raises(PtuneError, match=r"^task\.max_len=12 leaves no room .*task.template with task.demonstrations"):
        task.examples(tok, rows)


def test_soft_slots_stay_in_the_query(data_dir):
    backbone, method, task = setup("method=p-tuning", "task.template='{soft:2} {sentence} It was {mask} .'")
    [e] = task.examples(backbone.tokenizer, task.rows("dev")[:1])
    assert task.keep_soft and sum(e.soft) == 2 == method.num_virtual_tokens
    assert e.soft[1:3] == [True, True]  # right after [CLS], in the query only


# -- which rows ------------------------------------------------------------------------------------
def test_a_training_example_never_demonstrates_itself(data_dir):
    _, _, task = setup("task.few_shot=2")
    pool = task.training_rows()
    for s in range(10):
        for i, chosen in enumerate(task.demos.choose(task, pool, s, training=True)):
            assert i not in chosen
            assert [pool[j]["label"] for j in chosen] == [0, 1]
    task.few_shot, task._few, task.demos._pool = 1, None, None  # one row per class: nothing else to show
    with pytest.raises(PtuneError, match="needs 2 training rows of class 'negative'"):
        task.demos.choose(task, task.training_rows(), 0, training=True)


def test_draws_are_deterministic_and_follow_the_row_not_its_position(data_dir):
    backbone, _, a = setup()
    _, _, b = setup()
    tok = backbone.tokenizer
    assert [e.input_ids for e in a.train_examples(tok)] == [e.input_ids for e in b.train_examples(tok)]
    dev = a.rows("dev")[:12]
    first = [e.input_ids for e in a.examples(tok, dev, demo_set=3)]
    assert first == [e.input_ids for e in b.examples(tok, dev, demo_set=3)]
    assert first[::-1] == [e.input_ids for e in b.examples(tok, dev[::-1], demo_set=3)]
    assert first != [e.input_ids for e in a.examples(tok, dev, demo_set=4)]  # another set, other rows
    _, _, c = setup("task.few_shot_seed=21")  # another seed: another split and other draws
    assert a.demos.seed == 13 and c.demos.seed == 21


def _similar_task(monkeypatch):
    monkeypatch.setattr(demos, "load_encoder", lambda name: None)  # no real encoder: vectors are stubbed below
    backbone, method, task = setup("task.demonstrations=similar", "task.few_shot=8")
    return backbone, method, task


def test_similar_samples_only_among_the_most_similar_half(data_dir, monkeypatch):
    _, _, task = _similar_task(monkeypatch)
    pool = task.training_rows()
    angle = {r["sentence"]: 0.1 * n for n, r in enumerate(pool)}  # hand-made unit vectors on a circle

    def embedder(texts):
        return torch.tensor([[torch.cos(torch.tensor(angle.get(t, 0.0))), torch.sin(torch.tensor(angle.get(t, 0.0)))]
                             for t in texts])

    task.demos.embedder = embedder
    query = task.rows("dev")[0]  # not in the pool: angle 0, so the rows nearest it are the first ones
    picked = [set() for _ in task.labels]
    for s in range(40):
        [chosen] = task.demos.choose(task, [query], s, training=False)
        for c, i in enumerate(chosen):
            picked[c].add(i)
    for c in range(len(task.labels)):
        members = [i for i, r in enumerate(pool) if r["label"] == c]
        top = sorted(members, key=lambda i: angle[pool[i]["sentence"]])[:len(members) // 2]
        assert picked[c] == set(top)  # only the top half, and (40 draws) each of its 4 rows


def test_similar_with_minilm_ranks_by_real_sentence_embeddings(data_dir):
    encoder = demos.load_encoder("minilm")
    v = demos.embed(encoder, ["a wonderful , moving film", "a truly beautiful and touching movie",
                              "the stock market fell sharply on tuesday"])
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
    backbone, _, task = setup("task.demonstrations=similar", "task.few_shot=8")
    pool, query = task.training_rows(), task.rows("dev")[5]
    sims = (demos.embed(encoder, [query["sentence"]]) @ demos.embed(encoder, [r["sentence"] for r in pool]).T)[0]
    for s in range(5):
        [chosen] = task.demos.choose(task, [query], s, training=False)
        for c, i in enumerate(chosen):
            members = sorted((i for i, r in enumerate(pool) if r["label"] == c), key=lambda i: -float(sims[i]))
            assert i in members[:4]


# -- inference: N demonstration sets ---------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
def test_scores_over_n_sets_are_the_mean_of_the_single_set_scores(data_dir, model):
    _, method, task = setup("task.demo_sets=3", model=model)
    rows = task.rows("dev")[:6]
    mean = task.class_scores(method, rows, batch_size=4)
    singles = [task.class_scores(method, rows, batch_size=4, sets=[s]) for s in range(3)]
    assert not torch.allclose(singles[0], singles[1])  # the sets differ
    assert torch.allclose(mean, torch.stack(singles).mean(0), atol=1e-6)
    assert task.classify(method, rows, 4) == mean.argmax(-1).tolist()
    assert task.predict(method, [{"sentence": r["sentence"]} for r in rows], 4) == \
        [task.labels[i] for i in mean.argmax(-1).tolist()]


def test_mixed_batches_take_one_set_and_refuse_more(data_dir):
    backbone, method, task = setup(model="tiny-gpt2")
    pool = Pool(backbone, {"a": Adapter("a", method, task)})
    rows = [{"sentence": r["sentence"]} for r in task.rows("dev")[:3]]
    mixed = torch.stack(pool.class_scores(rows))
    assert torch.allclose(mixed, task.class_scores(method, [{**r, "label": 0} for r in rows], 3), atol=1e-5)
    task.demo_sets = 2
    with pytest.raises(PtuneError, match=r"^task.demo_sets=2 .*run the adapter alone"):
        pool.class_scores(rows)


def test_inputs_longer_than_the_model_positions_are_refused(data_dir):
    _, method, task = setup()
    method.backbone.model.config.max_position_embeddings = 20  # as if the model had 20 positions
    with pytest.raises(PtuneError, match=r"^with task.demonstrations the longest input is \d+ tokens plus 2 virtual "
                                         r"tokens, more than model tiny-bert's 20 positions; lower task.max_len$"):
        task.classify(method, task.rows("dev")[:2], 2)


# -- end to end ------------------------------------------------------------------------------------
def test_cli_train_and_eval_with_demonstrations(in_tmp, data_dir, capsys):
    args = ["train", *FEW, "model=tiny-bert", "task.demonstrations=random", "task.max_eval_samples=8",
            "trainer.batch_size=4", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2",
            "trainer.eval_batch_size=8"]
    assert main(args) == 0
    [run] = [p for p in (in_tmp / "outputs").glob("*/*") if (p / "summary.json").exists()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["examples"] == 8
    assert main(["eval", f"run={run}", "split=test"]) == 0  # the saved adapter and the same demonstrations
    assert json.loads((run / "eval_test.json").read_text())["metrics"] == summary["test"]["metrics"]
    assert main(["eval", f"run={run}", "split=test", "task.demo_sets=2"]) == 0
    assert json.loads((run / "eval_test.json").read_text())["overrides"] == {"task.demo_sets": 2}
    capsys.readouterr()
    assert main(["eval", f"run={run}", "split=test", "task.demo_sets=0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


# -- refusals, one line each -----------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["task.head=linear", "task.demonstrations=random"], r"task.demonstrations=random writes .* task.head=linear: use task.head=verbalizer"),
    (["task.demonstrations=nearest"], r"task.demonstrations='nearest' is not one of null, random, similar"),
    (["task.demonstrations=random", "task.demo_sets=0"], r"task.demo_sets=0 is invalid"),
    (["task.demo_sets=4"], r"task.demo_sets=4 averages .* task.demonstrations=null draws none"),
    (["task.demonstrations=similar", "task.demo_encoder=nope"], r"task.demo_encoder='nope' is not a model config"),
    (["task.demonstrations=similar", "task.demo_encoder=bert"], r"task.demo_encoder=bert cannot be loaded"),
])
def test_refusals_are_one_line(data_dir, overrides, message):
    head = [] if any(o.startswith("task.head=") for o in overrides) else ["task.head=verbalizer"]
    with pytest.raises(PtuneError, match=message) as e:
        build(compose(["task=sst2", "model=tiny-bert", "method=prompt", *head, *overrides]))
    assert "\n" not in str(e.value)


def test_custom_generation_refuses_demonstrations(tmp_path):
    f = tmp_path / "g.csv"
    f.write_text("text,label\na,b\n")
    with pytest.raises(PtuneError, match="task.type=generation has no classes: drop task.demonstrations"):
        tasks.build("custom", type="generation", head=None, train_file=str(f), eval_file=str(f),
                    demonstrations="random")

"""The knowledgeable verbalizer (KPT, ptune/heads/knowledgeable.py) and rules over several masks (PTR,
ptune/heads/rules.py): expansion, refinement and scores recomputed by hand from the plain tiny models;
the run directory round trip, padding, mixed batches and one-line refusals through the CLI."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import build_pool, randomize
from ptune.heads import knowledgeable
from ptune.build import build
from ptune.cli import compose, main
from ptune.data import collate, subsample
from ptune.errors import PtuneError
from ptune.heads import loss as head_loss
from ptune.heads.verbalizer import whole_words
from ptune.tasks.templates import Template

ROWS = [{"sentence": "a gorgeous , witty , seductive movie .", "label": 1}, {"sentence": "dull", "label": 0},
        {"sentence": "the plot is nothing but boilerplate clichés", "label": 0}]
PLAIN = ["task.kpt_neighbours=0", "task.kpt_threshold=null", "task.kpt_relevance=null", "task.kpt_calibrate=false"]
FILE = {"negative": ["awful", "bad", "great", "boring", "☃"], "positive": ["good", "fun", "boring", "excellent"]}

# A task made for two slots (PTR): aspect x polarity, four classes, written by the tests as CSV.
REVIEWS = [("the soup was lovely", "food_good"), ("the pasta was cold and bland", "food_bad"),
           ("the waiter was kind", "service_good"), ("we waited an hour for the bill", "service_bad"),
           ("fresh bread and tasty fish", "food_good"), ("the steak was burnt", "food_bad"),
           ("staff were friendly and quick", "service_good"), ("nobody took our order", "service_bad")]
RULES = ["task.head=rules", "task.template='{text} . The {mask:aspect} was {mask:polarity} .'",
         "task.slots={aspect: {food: food, service: [service, staff]}, polarity: {pos: great, neg: terrible}}",
         "task.rules={food_good: {aspect: food, polarity: pos}, food_bad: {aspect: food, polarity: neg}, "
         "service_good: {aspect: service, polarity: pos}, service_bad: {aspect: service, polarity: neg}}"]


def sst2(model, *overrides):
    return build(compose([f"model={model}", "task=sst2", "task.max_train_samples=4", "task.head=knowledgeable",
                          *overrides]))


@pytest.fixture()
def reviews(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in REVIEWS))
    return [f"task=custom", f"task.train_file={path}", f"task.eval_file={path}"]


def batch_of(task, tok, rows, side="right"):
    return collate(task.examples(tok, rows), tok.pad_token_id, padding_side=side)


@torch.no_grad()
def causal_log_prob(model, prefix: list[int], word: tuple) -> float:
    """log P(word | prefix) of a causal LM by full forwards, piece by piece."""
    total = 0.0
    for j, piece in enumerate(word):
        logits = model(input_ids=torch.tensor([prefix + list(word[:j])])).logits[0, -1]
        total += F.log_softmax(logits.float(), -1)[piece].item()
    return total


# -- templates ---------------------------------------------------------------------------------------
def test_named_masks_in_templates():
    t = Template("{text} The {mask:aspect} was {mask:polarity} .")
    assert t.mask_names == ["aspect", "polarity"] and t.mask_spaces == {"aspect": " ", "polarity": " "}
    assert Template("{sentence} It was {mask} .").mask_names == ["mask"]
    with pytest.raises(PtuneError, match="twice"):
        Template("{a} {mask:x} {mask:x}")
    with pytest.raises(PtuneError, match="reads one; keep one"):
        Template("{a} {mask:x} {mask:y}").require_mask("task.head=verbalizer")


# -- KPT: expansion ------------------------------------------------------------------------------------
def test_expansion_from_a_file_and_the_embedding_neighbours_by_hand(tmp_path):
    """File words after the manual ones; a word of both classes dropped from both unless manual
    ("great" stays positive's, "boring" goes); "☃" is [UNK] for WordPiece: left out; then the 2
    whole-word tokens with the largest cosine to the class's manual word, by hand."""
    path = tmp_path / "related.yaml"
    path.write_text(json.dumps(FILE))  # JSON is YAML
    backbone, method, _ = sst2("tiny-bert", *PLAIN, f"task.kpt_words={path}", "task.kpt_neighbours=2")
    head, tok = method.head, backbone.tokenizer
    table = backbone.model.get_input_embeddings().weight.detach()
    vocab = [(w, t) for w, t in whole_words(tok, " ") if w not in ("terrible", "great")]
    ids = torch.tensor([t for _, t in vocab])
    files = [["terrible", "awful", "bad"], ["great", "good", "fun", "excellent"]]
    near = []
    for manual in ("terrible", "great"):
        sims = F.cosine_similarity(table[ids], table[tok.convert_tokens_to_ids(manual)][None], dim=-1).tolist()
        near.append([vocab[i][0] for i in sorted(range(len(vocab)), key=lambda i: (-sims[i], i))[:2]])
    shared = set(near[0]) & set(near[1])
    want = [f + [w for w in n if w not in shared and w not in f] for f, n in zip(files, near)]
    assert head.texts == want
    assert head.sources[1][:4] == ["manual", "file", "file", "file"] and set(head.sources[1][4:]) <= {"neighbour"}
    assert head.words[0][:3] == [(6659,), (9643,), (2919,)] and head.log_priors is None


def test_merge_keeps_a_shared_word_only_where_it_is_manual():
    manual = [[("a",)], [("b",)]]
    assert knowledgeable.merge(manual, [[("b",), ("c",), ("d",)], [("c",), ("e",), ("e",)]]) == [
        [("a",), ("d",)], [("b",), ("e",)]]


# -- KPT: refinement -------------------------------------------------------------------------------------
def test_frequency_refinement_with_a_hand_made_prior(tmp_path, monkeypatch):
    """P_D(v) = the mean of P(v | x_i) over the prior rows; expanded words below task.kpt_threshold go,
    manual words stay whatever their prior; calibrated scores keep each word's log P_D(v)."""
    path = tmp_path / "related.json"
    path.write_text(json.dumps({"negative": ["awful", "bad"], "positive": ["good", "fun"]}))
    probs = torch.tensor([[1e-9, 1e-7, 1e-3, 1e-3, 2e-3, 1e-6],  # terrible awful bad | great good fun
                          [1e-9, 3e-7, 3e-3, 1e-3, 2e-3, 4e-7]])
    monkeypatch.setattr(knowledgeable, "word_log_probs", lambda m, t, words, rows: probs[:len(rows)].log())
    _, method, task = sst2("tiny-bert", "task.kpt_neighbours=0", f"task.kpt_words={path}", "task.kpt_prior_rows=2",
                           "task.kpt_threshold=1e-6", "task.kpt_relevance=null")
    head = method.head
    assert head.texts == [["terrible", "bad"], ["great", "good"]]
    removed = {r["word"]: r for r in head.record["removed"]}
    assert set(removed) == {"awful", "fun"} and all(r["by"] == "frequency" for r in removed.values())
    assert removed["awful"]["prior"] == pytest.approx(2e-7, rel=1e-5)
    assert removed["fun"]["prior"] == pytest.approx(7e-7, rel=1e-5)
    want = [[math.log(1e-9), math.log(2e-3)], [math.log(1e-3), math.log(2e-3)]]
    for got, w in zip(head.log_priors, want):
        assert got == pytest.approx(w, rel=1e-5)
    assert head.record["prior_rows"] == 2 and head.config()["settings"]["kpt_threshold"] == 1e-6


def _relevance_by_hand(logp, owner, manual, n_classes):
    m, n = len(logp), len(logp[0])
    cols = [[logp[i][v] for i in range(m)] for v in range(n)]
    cols = [[x - sum(c) / m for x in c] for c in cols]
    cls = []
    for c in range(n_classes):
        mine = [cols[v] for v in range(n) if owner[v] == c and manual[v]]
        cls.append([sum(col[i] for col in mine) / len(mine) for i in range(m)])

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    p = 10 / (n_classes - 2 + 0.01) + 1
    out = []
    for v in range(n):
        own = cos(cols[v], cls[owner[v]])
        others = [abs(cos(cols[v], cls[y])) for y in range(n_classes) if y != owner[v]]
        top = max(others)  # (mean of o^p)^(1/p) = top * (mean of (o / top)^p)^(1/p): o^1001 would underflow
        out.append(own / (top * (sum((o / top) ** p for o in others) / len(others)) ** (1 / p)) if own > 0
                   else float("-inf"))
    return out


@pytest.mark.parametrize("n_classes", [2, 3])
def test_relevance_by_hand(n_classes):
    """R(v) = cos(q_v, q_own) / power mean (p = 10 / (C - 2 + 0.01) + 1) of |cos(q_v, q_other)|; -inf when
    the own cosine is not positive."""
    g = torch.Generator().manual_seed(n_classes)
    owner = [0, 0, 0, 1, 1, 1] + ([2, 2] if n_classes == 3 else [])
    manual = [True, False, False, True, False, False] + ([True, False] if n_classes == 3 else [])
    logp = torch.randn(5, len(owner), generator=g, dtype=torch.float64)
    got = knowledgeable.relevance(logp, owner, manual, n_classes)
    want = _relevance_by_hand(logp.tolist(), owner, manual, n_classes)
    for a, b in zip(got.tolist(), want):
        assert a == pytest.approx(b, rel=1e-9) if math.isfinite(b) else a == b


def test_relevance_refinement_removes_a_word_that_follows_the_other_class(tmp_path, monkeypatch):
    path = tmp_path / "related.yaml"
    path.write_text("negative: [awful]\npositive: [good, fun]\n")
    terrible, great = [0.0, 1.0, 2.0, 3.0], [3.0, 1.0, 2.0, 0.0]
    cols = [terrible, [0.1, 1.1, 1.9, 3.2], great, [2.9, 1.2, 1.8, 0.1], [0.0, 1.0, 2.1, 2.9]]  # fun ~ terrible
    probs = torch.tensor(cols).T - 8.0
    monkeypatch.setattr(knowledgeable, "word_log_probs", lambda m, t, words, rows: probs)
    _, method, _ = sst2("tiny-bert", "task.kpt_neighbours=0", f"task.kpt_words={path}", "task.kpt_prior_rows=4",
                        "task.kpt_threshold=null", "task.kpt_relevance=1.0", "task.kpt_calibrate=false")
    head = method.head
    assert head.texts == [["terrible", "awful"], ["great", "good"]]
    [removed] = head.record["removed"]
    want = _relevance_by_hand(probs.tolist(), [0, 0, 1, 1, 1], [True, False, True, False, False], 2)[4]
    assert removed["word"] == "fun" and removed["by"] == "relevance"
    assert want == -math.inf and removed["relevance"] is None  # fun follows terrible: its own cosine is negative


# -- KPT: class scores ------------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregate", ["mean", "weighted"])
def test_knowledgeable_class_scores_by_hand(tmp_path, aggregate):
    """tiny-gpt2, the plain model: s(v | x) = log P(v | x) - log P_D(v) (P_D: the mean probability over the 4
    training rows, by hand), a 3-piece word teacher-forced; class score = mean or softmax(w)-weighted mean."""
    path = tmp_path / "related.yaml"
    path.write_text("negative: [awful, unwatchable]\npositive: [superb]\n")
    method_args = ["method=fine-tune", "method.trainable=head"] if aggregate == "weighted" else ["method=hard-prompt"]
    backbone, method, task = sst2("tiny-gpt2", *PLAIN[:3], f"task.kpt_words={path}", "task.kpt_prior_rows=4",
                                  f"task.kpt_aggregate={aggregate}", *method_args)
    head, model, tok = method.head, backbone.model, backbone.tokenizer
    assert head.texts == [["terrible", "awful", "unwatchable"], ["great", "superb"]]
    if aggregate == "weighted":
        randomize(head, 2)

    def word_logp(row, word):
        e = task.examples(tok, [row])[0]
        return causal_log_prob(model, e.input_ids[:e.mask_pos], word)

    train = task.training_rows()
    prior_rows = [train[i] for i in subsample(len(train), 4, task.subsample_seed)]
    got = head.scores(method, batch_of(task, tok, ROWS))
    for c, ws in enumerate(head.words):
        prior = [math.log(sum(math.exp(word_logp(r, w)) for r in prior_rows) / 4) for w in ws]
        assert head.log_priors[c] == pytest.approx(prior, abs=1e-4)
        for r, row in enumerate(ROWS):
            s = torch.tensor([word_logp(row, w) - p for w, p in zip(ws, head.log_priors[c])])
            lo = sum(len(x) for x in head.words[:c])
            alpha = (torch.softmax(head.word_weights.detach()[lo:lo + len(ws)], 0) if aggregate == "weighted"
                     else torch.full((len(ws),), 1 / len(ws)))
            assert got[r, c].item() == pytest.approx((alpha * s).sum().item(), abs=1e-4)
    total, n = head_loss(method, batch_of(task, tok, ROWS))
    want = F.cross_entropy(got, torch.tensor([1, 0, 0]), reduction="sum").item()
    assert total.item() == pytest.approx(want, rel=1e-5)
    if aggregate == "weighted":
        total.backward()
        assert head.word_weights.grad.abs().sum() > 0


# -- PTR: rule tables --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-bert"])
def test_a_rule_table_scored_by_hand(reviews, model):
    """score(y) = log sum over y's paths (service | staff) of P(w_aspect) P(w_polarity): left to right with
    the aspect word written in (causal), both slots from one input holding two [MASK]s (masked)."""
    backbone, method, task = build(compose([f"model={model}", *reviews, "method=hard-prompt", *RULES]))
    head, model_, tok = method.head, backbone.model, backbone.tokenizer
    rows = task.rows("train")[:3]
    got = head.scores(method, batch_of(task, tok, rows))
    aspect = {"food": ["food"], "service": ["service", "staff"]}
    polarity = {"pos": "great", "neg": "terrible"}
    rules = [(label.split("_")[0], "pos" if label.endswith("good") else "neg") for label in task.labels]

    def pieces(w):
        return tuple(tok(" " + w, add_special_tokens=False).input_ids)

    for r, row in enumerate(rows):
        e = task.examples(tok, [row])[0]
        a, b = e.masks
        ids = e.input_ids
        for c, (asp, pol) in enumerate(rules):
            paths = []
            for w in aspect[asp]:
                if backbone.kind == "causal":
                    first = causal_log_prob(model_, ids[:a], pieces(w))
                    second = causal_log_prob(model_, ids[:a] + list(pieces(w)) + ids[a + 1:b], pieces(polarity[pol]))
                else:
                    with torch.no_grad():
                        logp = F.log_softmax(model_(input_ids=torch.tensor([ids])).logits[0].float(), -1)
                    assert ids[a] == ids[b] == tok.mask_token_id
                    [wa], [wb] = pieces(w), pieces(polarity[pol])
                    first, second = logp[a, wa].item(), logp[b, wb].item()
                paths.append(first + second)
            assert got[r, c].item() == pytest.approx(math.log(sum(math.exp(p) for p in paths)), abs=1e-4)


def test_rules_train_with_cross_entropy_under_prompt_tuning(reviews):
    backbone, method, task = build(compose(["model=tiny-bert", *reviews, "method=prompt",
                                            "method.num_virtual_tokens=2", *RULES]))
    batch = batch_of(task, backbone.tokenizer, task.rows("train")[:4])
    total, n = head_loss(method, batch)
    scores = method.head.scores(method, batch)
    assert n == 4 and total.item() == pytest.approx(F.cross_entropy(scores, batch["labels"], reduction="sum").item(),
                                                    rel=1e-5)
    total.backward()
    assert method.prompt.grad.abs().sum() > 0


# -- batches -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, head", [("tiny-gpt2", "rules"), ("tiny-bert", "rules"), ("tiny-t5", "rules"),
                                         ("tiny-t5", "knowledgeable"), ("tiny-bert", "knowledgeable")])
def test_left_and_right_padded_batches_score_alike(reviews, model, head):
    if head == "rules":
        backbone, method, task = build(compose([f"model={model}", *reviews, "method=prefix",
                                                "method.num_virtual_tokens=2", *RULES]))
        rows = task.rows("train")[:4]
    else:
        backbone, method, task = sst2(model, *PLAIN[:3], "task.kpt_neighbours=3", "task.kpt_aggregate=weighted",
                                      "task.kpt_prior_rows=2", "method=p-tuning", "method.num_virtual_tokens=2")
        rows = ROWS
    randomize(method, 1)
    tok = backbone.tokenizer
    right, left = (method.head.scores(method, batch_of(task, tok, rows, side)) for side in ("right", "left"))
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


def test_mixed_batches_score_knowledgeable_rows_as_alone():
    small = ["task.max_train_samples=4", "task.kpt_prior_rows=2", "task.kpt_neighbours=2"]
    pool = build_pool("tiny-gpt2", {
        "kpt": ["task=sst2", "task.head=knowledgeable", *small, "method=prompt", "method.num_virtual_tokens=2"],
        "kptw": ["task=sst2", "task.head=knowledgeable", *small, "task.kpt_aggregate=weighted", "task.calibrate=true",
                 "method=prefix", "method.num_virtual_tokens=2"],
        "words": ["task=sst2", "task.head=verbalizer", "method=p-tuning-v2", "method.num_virtual_tokens=2"],
    })
    rows = [{"sentence": r["sentence"], "adapter": name} for name in pool.names for r in ROWS]
    mixed = pool.class_scores(rows[::-1])[::-1]
    alone = torch.cat([pool.alone(n)[1].class_scores(pool.alone(n)[0], ROWS, 8) for n in pool.names])
    torch.testing.assert_close(torch.stack(mixed).float(), alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-bert"])
def test_mixed_batches_score_rules_rows_as_alone(reviews, model):
    """PTR rows in a mixed batch: their slot words' queries share the forward with a word verbalizer's
    and a linear head's rows, and every row scores as its adapter alone (one calibrated)."""
    pool = build_pool(model, {
        "rules": [*reviews, *RULES, "method=prompt", "method.num_virtual_tokens=2"],
        "rules-cal": [*reviews, *RULES, "task.calibrate=true", "method=prefix", "method.num_virtual_tokens=2"],
        "words": ["task=sst2", "task.head=verbalizer", "method=p-tuning-v2", "method.num_virtual_tokens=2"],
        "linear": ["task=sst2", "task.head=linear", "method=prompt", "method.num_virtual_tokens=3"],
    })
    texts = [{"text": t} for t, _ in REVIEWS[:3]]
    rows = [{**r, "adapter": name} for name in ("rules", "rules-cal") for r in texts]
    rows += [{"sentence": r["sentence"], "adapter": name} for name in ("words", "linear") for r in ROWS]
    mixed = pool.class_scores(rows[::-1])[::-1]
    for name, inputs in (("rules", texts), ("rules-cal", texts), ("words", ROWS), ("linear", ROWS)):
        method, task = pool.alone(name)
        got = torch.stack([s for s, r in zip(mixed, rows) if r["adapter"] == name]).float()
        torch.testing.assert_close(got, task.class_scores(method, inputs, 8), rtol=1e-4, atol=1e-5)
    assert pool.predict(rows[:3]) == pool.alone("rules")[1].predict(pool.alone("rules")[0], texts, 8)


# -- the run directory and the CLI ----------------------------------------------------------------------------
SMALL = ["task.max_train_samples=16", "task.max_eval_samples=8", "trainer.batch_size=4", "trainer.max_steps=2",
         "trainer.eval_every=2", "trainer.save_every=2", "trainer.eval_batch_size=8"]


def only_run(root):
    [run] = [p for p in (root / "outputs").glob("*/*") if (p / "summary.json").exists()]
    return run


def one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("model, overrides", [
    ("tiny-gpt2", ["method=hard-prompt", "task.kpt_neighbours=3"]),  # zero-shot
    ("tiny-bert", ["method=prompt", "method.num_virtual_tokens=2", "task.kpt_aggregate=weighted"]),  # few-shot
])
def test_a_knowledgeable_run_saves_its_words_and_inference_reads_them(in_tmp, data_dir, capsys, monkeypatch,
                                                                      model, overrides):
    (in_tmp / "related.yaml").write_text("negative: [awful, bad]\npositive: [good, excellent]\n")
    assert main(["train", f"model={model}", "task=sst2", "task.head=knowledgeable", "task.kpt_words=related.yaml",
                 "task.kpt_prior_rows=8", *overrides, *SMALL]) == 0
    run = only_run(in_tmp)
    head = json.loads((run / "adapter/adapter_config.json").read_text())["head"]
    assert head["kind"] == "knowledgeable" and [ws[0] for ws in head["words"]] == ["terrible", "great"]
    seen = {w for ws in head["words"] for w in ws} | {r["word"] for r in head["removed"]}  # kept or removed, with why
    assert {"awful", "bad", "good", "excellent"} <= seen and all(r["by"] in ("frequency", "relevance")
                                                                  for r in head["removed"])
    assert [len(p) for p in head["log_prior"]] == [len(w) for w in head["words"]] and head["prior_rows"] == 8
    from safetensors.torch import load_file

    saved = load_file(run / "adapter/adapter_model.safetensors")
    assert ("head.word_weights" in saved) == ("task.kpt_aggregate=weighted" in overrides)

    def never(*a, **k):
        raise AssertionError("inference recomputed the refinement")

    monkeypatch.setattr(knowledgeable, "refine", never)
    monkeypatch.setattr(knowledgeable, "neighbours", never)
    (in_tmp / "related.yaml").unlink()  # inference reads the saved list, not the file
    assert main(["eval", f"run={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == summary["eval"]
    rows = in_tmp / "rows.jsonl"
    rows.write_text("".join(json.dumps({"sentence": r["sentence"], "adapter": "ab"[i % 2]}) + "\n"
                            for i, r in enumerate(ROWS)))  # a mixed batch of the run's adapter loaded twice
    assert main(["predict", f"run=a:{run},b:{run}", f"input={rows}", f"output={in_tmp / 'p.jsonl'}"]) == 0
    mixed = [json.loads(line)["prediction"] for line in (in_tmp / "p.jsonl").read_text().splitlines()]
    records = json.loads((run / "eval_dev.json").read_text())
    assert len(mixed) == 3 and records["examples"] == 8
    capsys.readouterr()
    one_line_error(capsys, ["eval", f"run={run}", "task.kpt_threshold=0.5"], "refined with task.kpt_threshold=1e-06")


def test_a_rules_run_round_trips_and_serves_in_mixed_batches_and_ensembles(in_tmp, data_dir, capsys, reviews):
    assert main(["train", "model=tiny-bert", *reviews, "method=prompt", "method.num_virtual_tokens=2", *RULES,
                 *SMALL]) == 0
    run = only_run(in_tmp)
    head = json.loads((run / "adapter/adapter_config.json").read_text())["head"]
    assert head["kind"] == "rules" and head["slots"] == ["aspect", "polarity"]
    assert dict(zip(head["labels"], head["rules"]))["service_good"] == {"aspect": "service", "polarity": "pos"}
    assert main(["eval", f"run={run}"]) == 0
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == json.loads(
        (run / "summary.json").read_text())["eval"]
    rows = in_tmp / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the soup was cold", "staff were rude")))
    assert main(["predict", f"run={run}", f"input={rows}", f"output={in_tmp / 'p.jsonl'}"]) == 0
    alone = [json.loads(x)["prediction"] for x in (in_tmp / "p.jsonl").read_text().splitlines()]
    both = in_tmp / "both.jsonl"
    both.write_text("".join(json.dumps({"text": t, "adapter": a}) + "\n" for a in ("a", "b")
                            for t in ("the soup was cold", "staff were rude")))
    assert main(["predict", f"run=a:{run},b:{run}", f"input={both}", f"output={in_tmp / 'm.jsonl'}"]) == 0
    assert [json.loads(x)["prediction"] for x in (in_tmp / "m.jsonl").read_text().splitlines()] == alone * 2
    copy = in_tmp / "copy"
    shutil.copytree(run, copy)  # an ensemble's members are different runs: the same adapter twice
    assert main(["eval", f"run={run},{copy}", "ensemble=vote", f"out={in_tmp / 'e.json'}"]) == 0
    ensemble = json.loads((in_tmp / "e.json").read_text())
    assert [m["metrics"] for m in ensemble["members"]] == [json.loads((run / "eval_dev.json").read_text())["metrics"]] * 2


@pytest.mark.parametrize("argv, message", [
    (["task=sst2", "task.head=knowledgeable", "task.kpt_aggregate=weighted", "method=hard-prompt"],
     "task.kpt_aggregate=weighted trains a weight per label word, and method=hard-prompt trains nothing"),
    (["task=sst2", "model.kind=encoder", "task.head=knowledgeable"], "encoder without an LM head"),
    (["task=sst2", "task.head=knowledgeable", "task.kpt_words=missing.yaml"],
     "task.kpt_words=missing.yaml: no such file"),
    (["task=sst2", "task.head=knowledgeable", "task.kpt_aggregate=max"], "task.kpt_aggregate='max' is not one of"),
    (["task=sst2", "task.head=knowledgeable", "task.demonstrations=random"], "use task.head=verbalizer"),
    (["task=sst2", "task.head=verbalizer", "task.template='{sentence} {mask:a} {mask:b}'"], "with task.head=rules"),
    (["task=sst2", "task.head=rules"], "task.head=rules needs task.slots"),
    (["task=sst2", "task.head=verbalizer", "task.slots={mask: {a: good}}"], "use task.head=rules"),
    (["task=sst2", "task.head=rules", "task.slots={mask: {neg: bad, pos: good}}", "task.rules={negative: {mask: neg}}"],
     "no rule for the label 'positive'"),
    (["task=sst2", "task.head=rules", "task.slots={mask: {neg: bad, pos: good}}",
      "task.rules={negative: {mask: neg}, positive: {mask: neg}}"], "the same values"),
    (["task=sst2", "task.head=rules", "task.template='{sentence} {mask:a} {mask:a}'"], "twice"),
    (["task=sst2", "model=tiny-gpt2", "task.head=rules", "task.template='{mask:a} was {sentence}'",
      "task.slots={a: {neg: bad, pos: good}}", "task.rules={negative: {a: neg}, positive: {a: pos}}"],
     "after the last answer slot"),
])
def test_refusals_are_one_line_exit_2(in_tmp, data_dir, capsys, argv, message):
    if not any(a.startswith("model=") for a in argv):
        argv = ["model=tiny-bert", *argv]
    if not any(a.startswith("method=") for a in argv):
        argv = [*argv, "method=prompt"]
    fast = ["task.kpt_neighbours=0"] if "task.head=knowledgeable" in argv else []  # refused under other heads
    one_line_error(capsys, ["train", *fast, *argv], message)
    assert not (in_tmp / "outputs").exists()


@pytest.mark.parametrize("bad", [{"log_prior": [["x"]]}, {"log_prior": [[float("nan")]]},
                                 {"word_pieces": [[[1]] * 10_001, [[2]]]}])
def test_a_hostile_saved_word_list_is_one_line(bad):
    """adapter_config.json is untrusted: malformed priors or an oversized list are refused before use."""
    from ptune.heads import knowledgeable
    from ptune.build import build_backbone
    from ptune.config import compose

    backbone = build_backbone(compose(["model=tiny-gpt2"]))
    saved = {"kind": "knowledgeable", "settings": {}, "word_pieces": [[[1]], [[2]]], "log_prior": [[-1.0], [-1.0]], **bad}
    with pytest.raises(PtuneError, match="no valid word_pieces / log_prior"):
        knowledgeable.restore(backbone, saved, {}, ["negative", "positive"], {})

"""LM-BFF's automatic template search (ptune.search.template) on tiny random models: the parse of
T5's span output, the summed beam against brute force, the CLI end to end, resume == uninterrupted,
and the templates it finds training with hard-prompt and prompt."""

import itertools
import json
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ptune import cli, search
from ptune.search import base, template
from ptune.search.template import parse_spans, template_text

FAST = ["task.few_shot=4", "task.max_eval_samples=8", "search.beam=3", "search.max_tokens=3", "task.max_len=40",
        "trainer.eval_batch_size=16"]
SST2_T5 = ["template", "model=tiny-t5", "task=sst2", *FAST]


# -- reading what the model wrote --------------------------------------------------------------------
def test_parse_spans_reads_t5_outputs():
    s0, s1, s2 = 32099, 32098, 32097  # <extra_id_0..2> in T5's vocabulary
    assert parse_spans([0, s0, 5, 6, s1, 7, s2, 1, 0], [s0, s1, s2]) == [[5, 6], [7]]  # start, </s>, pad ignored
    assert parse_spans([0, s0, s1, 8, s2], [s0, s1, s2]) == [[], [8]]  # an empty X
    assert parse_spans([0, s0, 5, s1, 7], [s0, s1, s2]) is None  # no closing sentinel
    assert parse_spans([0, s1, 5, s0, 7, s2], [s0, s1, s2]) is None  # out of order
    assert parse_spans([0, s0, 5, s1, 7, s1, 9, s2], [s0, s1, s2]) == [[5], [7, s1, 9]]


def test_template_text_per_placement():
    assert template_text("after", ["sentence"], [" It was", "."], False) == "{sentence} It was {mask} ."
    assert template_text("before", ["sentence"], ["", " !"], False) == "{mask} ! {sentence}"
    assert template_text("between", ["premise", "hypothesis"], ["?", ","], False) == "{premise} ? {mask} , {hypothesis}"
    assert template_text("after", ["premise", "hypothesis"], [" so"], True) == "{premise} {hypothesis} so {mask} ."
    assert template_text("after", ["sentence"], ["{x}", ""], False) == "{sentence} {{x}} {mask}"  # braces stay literal


def test_markers_are_the_tokenizers_own_or_stand_ins():
    from types import SimpleNamespace

    from ptune.models import load_tokenizer

    tok = load_tokenizer("smollm2", "")
    plain = SimpleNamespace(tokenizer=tok, name="tiny")
    assert template.markers(plain, 3) == [3, 4, 5]  # stand-ins: SmolLM2's added tokens <repo_name>, ...
    assert template.markers(plain, 1) == [3]
    sentinels = [f"<extra_id_{k}>" for k in range(3)]
    tok.add_special_tokens({"additional_special_tokens": sentinels, "mask_token": "<mask>"})
    assert template.markers(plain, 3) == tok.convert_tokens_to_ids(sentinels)  # T5's
    assert template.markers(plain, 1) == [tok.mask_token_id]  # BART's
    free = template.free_tokens(tok, len(tok))
    assert not free[tok.convert_tokens_to_ids(sentinels)].any() and not free[:17].any()
    assert free[tok(" great", add_special_tokens=False).input_ids[0]]
    assert not free[tok("\n", add_special_tokens=False).input_ids[0]]


# -- the summed beam against brute force --------------------------------------------------------------
@torch.no_grad()
def full_log_likelihood(backbone, prog, gaps) -> float:
    """log P of everything after forced[0], one plain forward per row (no batching, no cached encoder)."""
    forced = prog["forced"]
    seq = list(forced[0]) + [t for g, f in zip(gaps, forced[1:]) for t in list(g) + list(f)]
    ids = torch.tensor([seq])
    if prog["encoder"] is None:
        logits = backbone.model(input_ids=ids).logits[0]
    else:
        logits = backbone.model(input_ids=torch.tensor([prog["encoder"]]), decoder_input_ids=ids).logits[0]
    logp = F.log_softmax(logits.float(), -1)
    return sum(float(logp[p, seq[p + 1]]) for p in range(len(forced[0]) - 1, len(seq) - 1))


@pytest.mark.parametrize("model, task, placement", [("tiny-t5", "sst2", "after"), ("tiny-bart", "rte", "between"),
                                                    ("tiny-gpt2", "sst2", "after"), ("tiny-llama", "cb", "after")])
def test_summed_beam_equals_brute_force(model, task, placement):
    cfg = search.compose_search("template", [f"model={model}", f"task={task}", *FAST, "task.max_len=24"])
    scorer = base.Scorer(cfg)
    train = scorer.rows("train")
    rows = [next(r for r in train if r["label"] == c) for c in range(2)]  # both label words
    _, progs = template.programs(scorer.backbone, scorer.variant(), rows, placement, 2)
    n_gaps = len(progs[0]["forced"]) - 1
    vocab = scorer.backbone.model.get_output_embeddings().weight.shape[0]
    tiny = [1000, 2000, 3000][:4 - n_gaps]  # a vocabulary of 3 (one gap) or 2 (two) tokens, at most 2 in all gaps
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[tiny] = True
    brute = {}
    for n in range(1, 3):
        for toks in itertools.product(tiny, repeat=n):
            for cut in (range(n + 1) if n_gaps == 2 else [n]):  # where X ends and Y begins
                gaps = (tuple(toks[:cut]), tuple(toks[cut:])) if n_gaps == 2 else (tuple(toks),)
                brute[gaps] = sum(full_log_likelihood(scorer.backbone, p, gaps) for p in progs)
    step = template.Stepper(scorer.backbone, progs, batch_size=3)  # rows (hypothesis, row) split across batches
    found = dict(template.summed_beam(step, n_gaps, beam=200, max_tokens=2, allowed=allowed))
    assert set(found) == set(brute)
    for gaps, score in brute.items():
        assert found[gaps] == pytest.approx(score, abs=1e-3)
    narrow = template.summed_beam(step, n_gaps, beam=2, max_tokens=2, allowed=allowed)
    assert len(narrow) == 2 and narrow[0][1] <= max(brute.values()) + 1e-3
    assert all(narrow[0][1] >= s for _, s in narrow)  # best first


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_causal_cached_step_equals_rereading_every_prefix(model):
    """Stepper's causal path (each row's prefix cached, only gap + label word fed) against its general
    path (every (hypothesis, row) read whole), over the whole vocabulary, at gap lengths 0 to 3."""
    cfg = search.compose_search("template", [f"model={model}", "task=sst2", *FAST, "task.max_len=24"])
    scorer = base.Scorer(cfg)
    _, progs = template.programs(scorer.backbone, scorer.variant(), scorer.rows("train")[:5], "after", 4)
    step = template.Stepper(scorer.backbone, progs, batch_size=2)
    odd = ((7, 8, 9, 10, 11),)  # a hypothesis of another length sends the call down the general path
    for t in range(4):
        hyps = [(tuple(range(100 + h, 100 + h + t)),) for h in range(3)]
        ext, close = step(hyps)
        ext_all, close_all = step([*hyps, odd])
        assert torch.allclose(ext, ext_all[:3], atol=1e-4) and torch.allclose(close, close_all[:3], atol=1e-4)


# -- the search end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def t5_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("t5")
    summary = search.run([*SST2_T5, f"output_dir={out}"])
    return Path(summary["dir"])


def read_candidates(sdir):
    return [json.loads(x) for x in (sdir / "candidates.jsonl").read_text().splitlines()]


def test_t5_search_writes_the_best_dev_template(t5_search):
    cands = read_candidates(t5_search)
    assert {c["placement"] for c in cands} == {"after", "before"} and len({c["template"] for c in cands}) == len(cands)
    for c in cands:
        assert "{sentence}" in c["template"] and "{mask}" in c["template"] and 0 <= c["dev_accuracy"] <= 1
        assert c["decoded"].count("<repo_name>") == 1  # the stand-in for <extra_id_0>: SmolLM2's tokenizer has none
    summary = json.loads((t5_search / "summary.json").read_text())
    best = max(cands, key=lambda c: (c["dev_accuracy"], c["log_likelihood"]))
    assert summary["found"]["template"] == best["template"] and summary["best"]["accuracy"] == best["dev_accuracy"]
    assert summary["found"]["verbalizer"] == {"negative": ["terrible"], "positive": ["great"]}
    after = [c for c in cands if c["placement"] == "after"]
    assert all(c["template"].startswith("{sentence} ") for c in after)
    assert [c["log_likelihood"] for c in after] == sorted((c["log_likelihood"] for c in after), reverse=True)


@pytest.mark.parametrize("method", ["hard-prompt", "prompt"])
def test_the_found_template_trains(t5_search, tmp_path, method):
    args = shlex.split((t5_search / "overrides.txt").read_text())
    assert cli.main(["train", "model=tiny-t5", "task=sst2", "task.few_shot=4", "task.max_eval_samples=8",
                     f"method={method}", *args,
                     "trainer.max_steps=2", "trainer.batch_size=4", f"output_dir={tmp_path}"]) == 0


@pytest.mark.parametrize("model, placement_of", [("tiny-bart", "{premise} "),
                                                 ("tiny-llama", "{premise} {hypothesis} ")])
def test_two_field_tasks(model, placement_of, tmp_path):
    summary = search.run(["template", f"model={model}", "task=rte", *FAST, "search.beam=2", "search.max_tokens=2",
                          f"output_dir={tmp_path}"])
    sdir = Path(summary["dir"])
    for c in read_candidates(sdir):
        assert c["template"].startswith(placement_of) and c["template"].endswith("{hypothesis}" if model == "tiny-bart"
                                                                                  else "{mask} .")
    args = shlex.split((sdir / "overrides.txt").read_text())
    assert cli.main(["train", f"model={model}", "task=rte", "task.few_shot=4", "task.max_eval_samples=8",
                     "method=hard-prompt", *args,
                     f"output_dir={tmp_path}/run"]) == 0


def test_a_resumed_search_equals_an_uninterrupted_one(t5_search, tmp_path, monkeypatch):
    """Killed twice: after the first placement's beam (save 1), then, resumed, in the middle of the
    dev scores (save 4 of 5); the second resume ends with the uninterrupted search's files."""
    real = base.SearchDir.save
    calls = {"n": 0}

    def save_then_die(self, state, candidates):
        real(self, state, candidates)
        calls["n"] += 1
        if calls["n"] in (1, 4):
            raise KeyboardInterrupt

    monkeypatch.setattr(base.SearchDir, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        search.run([*SST2_T5, f"output_dir={tmp_path}"])
    [sdir] = list(tmp_path.glob("*/*"))
    assert set(json.loads((sdir / "search_state.json").read_text())["generated"]) == {"after"}
    with pytest.raises(KeyboardInterrupt):
        search.run([f"resume={sdir}"])
    assert 0 < json.loads((sdir / "search_state.json").read_text())["dev_scored"] < len(read_candidates(t5_search))
    assert not (sdir / "result.yaml").exists()
    search.run([f"resume={sdir}"])
    assert calls["n"] == 5
    for name in ("candidates.jsonl", "result.yaml", "overrides.txt"):
        assert (sdir / name).read_text() == (t5_search / name).read_text()


@pytest.mark.parametrize("args, msg", [
    (["template", "model=tiny-bert", "task=sst2", "task.few_shot=4"], "generate with one (e.g. model=t5)"),
    (["template", "model=tiny-gpt2", "task=sst2", "task.few_shot=4", "search.placements=[before]"],
     "a causal model (model=tiny-gpt2) cannot read"),
    (["template", "model=tiny-t5", "task=sst2", "task.few_shot=4", "search.placements=[inside]"],
     "search.placements=['inside'] is invalid"),
    (["template", "model=tiny-t5", "task=sst2", "task.few_shot=4", "search.placements=[between]"],
     "the task has one (sentence)"),
    (["template", "model=tiny-t5", "task=sst2", "task.few_shot=4", "search.beam=0"], "search.beam=0 is invalid"),
    (["template", "model=tiny-t5", "task=sst2"], "set task.few_shot=K"),
    (["template", "model=tiny-gpt2", "task=sst2", "task.few_shot=4", "task.max_len=8"],
     "task.max_len=8 leaves no room for the inputs beside the label word"),
])
def test_template_search_refusals_are_one_line(args, msg, in_tmp, capsys):
    code = cli.main(["search", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and msg in err[0], err
    assert not (in_tmp / "outputs").exists() or not any((in_tmp / "outputs").rglob("result.yaml"))

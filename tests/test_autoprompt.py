"""AutoPrompt (ptune.search.autoprompt) and the template's {trigger:N} slots it fills: parsing and
encoding, refusals, the gradient and the candidate step, a search on every backbone kind whose
overrides train, resumed == uninterrupted, and the label search."""

import json
import shlex

import pytest
import torch

from conftest import crash_after_search_save
from ptune import cli, tasks
from ptune.data import collate
from ptune.errors import PtuneError
from ptune.search import autoprompt, base, compose_search
from ptune.tasks.templates import Template, token_ids

FEW = ["task=sst2", "task.few_shot=4", "trainer.eval_batch_size=8"]
TRAIN = [*FEW, "task.max_eval_samples=8"]  # the few-shot dev rows, and 8 of the reported test split's 872
SEARCH = [*FEW, "search.iters=3", "search.num_cand=3", "search.batch_size=4", "search.save_every=1"]
KINDS = ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5", "tiny-bart"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared machine: one thread is ~50x faster than two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_line(capsys, code, msg):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and msg in err[0], err


# -- the template slot ---------------------------------------------------------------------------------
def test_trigger_slots_parse_encode_and_are_never_cut(tiny_tok):
    t = Template("{sentence} {trigger:3} {mask} .")
    assert t.n_trigger == 3 and t.n_soft == 0 and t.mask_space == " "
    assert Template("{trigger} {sentence} {mask}").n_trigger == 1
    assert t.render({"sentence": "so good"}) == "so good [T][T][T] [MASK] ."
    ids = token_ids(tiny_tok, ["Ġatmosphere", "Ġtotally", "Ġdialogue"])
    row = {"sentence": "a real joy and a long sentence that will be cut"}
    full = t.encode(tiny_tok, row, 128, mask_id=7, triggers=ids)
    at = full.mask_pos
    assert full.ids[at - 3:at] == ids and full.ids[at] == 7 and not any(full.soft)
    short = t.encode(tiny_tok, row, 8, mask_id=7, triggers=ids)  # the sentence loses tokens, the triggers none
    assert len(short.ids) == 8 and short.ids[short.mask_pos - 3:short.mask_pos] == ids
    with pytest.raises(PtuneError, match="has 3 {trigger} positions and task.triggers is null"):
        t.encode(tiny_tok, row, 128, mask_id=7)
    with pytest.raises(PtuneError, match="lists 2"):
        t.encode(tiny_tok, row, 128, mask_id=7, triggers=ids[:2])
    with pytest.raises(PtuneError, match="has no positions; use {trigger:N}, N >= 1"):
        Template("{sentence} {trigger:0} {mask}")


@pytest.fixture(scope="module")
def tiny_tok():
    from ptune.models import load_tokenizer

    return load_tokenizer("smollm2", "")


def build_task(**kw):
    return tasks.build("sst2", head="verbalizer", data_dir=None, **kw)


def test_the_task_refuses_missing_or_unknown_triggers(tiny_tok):
    with pytest.raises(PtuneError, match="task.triggers is null; give 3 token strings"):
        build_task(template="{sentence} {trigger:3} {mask} .")
    with pytest.raises(PtuneError, match="task.triggers lists 1"):
        build_task(template="{sentence} {trigger:3} {mask} .", triggers=["Ġthe"])
    with pytest.raises(PtuneError, match="set task.triggers=null or add"):
        build_task(template="{sentence} {mask} .", triggers=["Ġthe"])
    with pytest.raises(PtuneError, match="must be a list of token strings"):
        build_task(template="{sentence} {trigger} {mask} .", triggers=[3])
    with pytest.raises(PtuneError, match="'Ġnotatoken' is not a token of this tokenizer; .*' the' is 'Ġthe'"):
        token_ids(tiny_tok, ["Ġthe", "Ġnotatoken"])


@pytest.mark.parametrize("args, msg", [
    (["train", "model=tiny-gpt2", "task=sst2", "task.head=verbalizer", "method=hard-prompt",
      "task.template='{sentence} {trigger:2} {mask} .'"], "task.triggers is null"),
    (["train", "model=tiny-gpt2", "task=sst2", "task.head=verbalizer", "method=hard-prompt",
      "task.template='{sentence} {trigger} {mask} .'", "task.triggers=[\"Ġnotatoken\"]"], "not a token"),
    (["search", "autoprompt", "model=tiny-gpt2", "task=sst2"], "set task.few_shot=K"),
    (["search", "autoprompt", "model=tiny-gpt2", *FEW, "search.template='{sentence} {mask} .'"], "no {trigger} slots"),
    (["search", "autoprompt", "model=tiny-gpt2", *FEW, "search.template='{sentence} {mask} {trigger:2}'"],
     "after {mask}, which a causal model"),
    (["search", "autoprompt", "model=tiny-gpt2", *FEW, "search.label_tokens=both"], "search.label_tokens='both'"),
    (["search", "autoprompt", "model=tiny-gpt2", *FEW, "search.num_cand=0"], "search.num_cand=0 is invalid"),
])
def test_refusals_are_one_line_exit_2(args, msg, in_tmp, capsys):
    one_line(capsys, cli.main(args), msg)
    assert not (in_tmp / "outputs").exists()


def test_methods_read_triggers_as_tokens(in_tmp):
    """hard-prompt, prompt and p-tuning (with {soft} slots beside the triggers) train on a trigger template."""
    common = ["model=tiny-gpt2", *TRAIN, "task.head=verbalizer", "trainer.max_steps=1", "trainer.batch_size=4",
              "task.triggers=[\"Ġatmosphere\",\"Ġtotally\"]"]
    assert cli.main(["train", *common, "method=p-tuning", "method.num_virtual_tokens=2",
                     "task.template='{soft:2} {sentence} {trigger:2} {mask} .'"]) == 0
    assert cli.main(["train", *common, "method=prompt", "task.template='{sentence} {trigger:2} {mask} .'"]) == 0
    configs = [json.loads(p.read_text()) for p in sorted(in_tmp.glob("outputs/*/*/adapter/adapter_config.json"))]
    assert [c["head"]["triggers"] for c in configs] == [["Ġatmosphere", "Ġtotally"]] * 2
    assert configs[0]["head"]["triggers_text"] == " atmosphere totally"


# -- the pieces of an iteration ---------------------------------------------------------------------------
def test_hotflip_picks_the_token_the_gradient_says():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [-3.0, -3.0]])
    grad = torch.tensor([2.0, 0.5])  # -(grad . e): 4 -> 7.5, 2 -> 2, 3 -> 0.5, 1 -> -0.5, 0 -> -2
    allowed = torch.ones(5, dtype=torch.bool)
    assert autoprompt.hotflip(grad, emb, allowed, 3) == [4, 2, 3]
    allowed[4] = False  # e.g. a special token or a label word
    assert autoprompt.hotflip(grad, emb, allowed, 2) == [2, 3]


def searcher(model, *extra):
    cfg = compose_search("autoprompt", [f"model={model}", *SEARCH, *extra])
    scorer = base.Scorer(cfg)
    tok = scorer.backbone.tokenizer
    rows = scorer.rows("train")
    seen = {i for e in scorer.task.examples(tok, rows) for i in e.input_ids}
    rare = [t for t in ("Ġzebra", "Ġquartz", "zebra", "quartz") if tok.convert_tokens_to_ids(t) not in
            (None, tok.unk_token_id) and tok.convert_tokens_to_ids(t) not in seen][:2]
    task = scorer.variant(template="{sentence} {trigger:2} {mask} .", triggers=rare)
    return autoprompt.Search(cfg, scorer, task), rows


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-bert", "tiny-t5", "tiny-bart"])
def test_the_gradient_is_the_loss_derivative_at_a_trigger(model):
    """dL/d(embedding at slot j) from the placeholders and hooks against central differences of the
    scoring path's L, with the embedding output at slot j moved along the gradient."""
    run, rows = searcher(model)
    trig = run.task.trigger_ids
    batch = collate(run.examples(rows, run.grad.placeholders(2)), run.tok.pad_token_id)
    loss, grad = run.grad(run.scorer.method, run.head, batch, trig)
    assert loss == pytest.approx(float(run.losses(rows, [trig])[0]), abs=1e-5)
    j = 1
    d = grad[j] / grad[j].norm()

    def loss_moved(eps):
        def move(module, args, out):
            return out + eps * d.to(out) * (args[0] == trig[j])[..., None]
        hook = run.grad.emb.register_forward_hook(move)
        try:
            return float(run.losses(rows, [trig])[0])
        finally:
            hook.remove()

    eps = 1e-2
    slope = (loss_moved(eps) - loss_moved(-eps)) / (2 * eps)
    assert slope == pytest.approx(float(grad[j].norm()), rel=0.05)


def test_one_iteration_lowers_or_keeps_the_loss_on_its_batch():
    run, _ = searcher("tiny-llama")
    old = run.task.trigger_ids
    for it in (1, 2):
        new, record = run.step(old, it)
        _, _, eval_rows = run.draw(it, len(old))
        before, after = run.losses(eval_rows, [old, new]).tolist()
        assert after <= before and before == pytest.approx(record["batch_loss"])
        assert (after < before) == record["accepted"] and (new != old) == record["accepted"]
        assert sum(a != b for a, b in zip(old, new)) <= 1 and run.allowed[new].all() or new == old
        old = new


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-t5", "tiny-bart"])
def test_mask_states_are_what_the_output_embedding_reads(model):
    """log_softmax(output embedding(state)) == the vocabulary head's log-probs at {mask}, per kind."""
    from ptune.heads.verbalizer import VocabHead

    run, rows = searcher(model)
    batch = collate(run.task.examples(run.tok, rows[:4]), run.tok.pad_token_id)
    method = run.scorer.method
    with torch.no_grad():
        states = autoprompt.MaskStates(run.scorer.backbone).states(method, batch)
        logits = method.backbone.model.get_output_embeddings()(states)
        want = VocabHead(run.scorer.backbone).scores(method, batch)
    assert torch.allclose(torch.log_softmax(logits, -1), want, atol=1e-4)


# -- whole searches --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def searches(tmp_path_factory):
    out = {}
    for model in KINDS:  # BERT: the template as a task key, its triggers filled with [MASK] by the search
        root = tmp_path_factory.mktemp(model)
        given = ["task.template='{sentence} {trigger:3} {mask} .'"] if model == "tiny-bert" else []
        assert cli.main(["search", "autoprompt", f"model={model}", *SEARCH, *given, f"output_dir={root}"]) == 0
        [out[model]] = list(root.glob("*/*"))
    return out


@pytest.mark.parametrize("model", KINDS)
def test_a_search_finishes_and_its_overrides_train_with_nothing_trained(model, searches, tmp_path):
    sdir = searches[model]
    summary = json.loads((sdir / "summary.json").read_text())
    found = summary["found"]
    assert found["template"] == "{sentence} {trigger:3} {mask} ." and len(found["triggers"]) == 3
    cands = [json.loads(x) for x in (sdir / "candidates.jsonl").read_text().splitlines()]
    assert [c["iteration"] for c in cands] == [0, 1, 2, 3]
    assert cands[0]["triggers"] == ["[MASK]"] * 3 if model == "tiny-bert" else ["Ġthe"] * 3
    best = min(cands, key=lambda c: (-c["dev_accuracy"], c["dev_loss"], c["iteration"]))
    assert found["triggers"] == best["triggers"] and summary["best"]["accuracy"] == best["dev_accuracy"]
    args = shlex.split((sdir / "overrides.txt").read_text())
    assert cli.main(["train", f"model={model}", *TRAIN, "method=hard-prompt", *args, f"output_dir={tmp_path}"]) == 0
    [run] = list(tmp_path.glob("*/*"))
    trained = json.loads((run / "summary.json").read_text())
    assert trained["trainable_params"] == 0 and trained["eval"]["accuracy"] == summary["best"]["accuracy"]
    head = json.loads((run / "adapter" / "adapter_config.json").read_text())["head"]
    assert head["triggers"] == found["triggers"] and head["template"] == found["template"]


def test_the_found_prompt_composes_with_prompt_tuning(searches, tmp_path):
    args = shlex.split((searches["tiny-bert"] / "overrides.txt").read_text())
    assert cli.main(["train", "model=tiny-bert", *TRAIN, "method=prompt", *args, "trainer.max_steps=2",
                     "trainer.batch_size=4", f"output_dir={tmp_path}"]) == 0


def test_a_resumed_search_equals_an_uninterrupted_one(searches, tmp_path, monkeypatch):
    restore = crash_after_search_save(monkeypatch, 3)  # iterations 0, 1 and 2 saved: killed before 3
    assert cli.main(["search", "autoprompt", "model=tiny-gpt2", *SEARCH, f"output_dir={tmp_path}"]) == 130
    restore()
    [sdir] = list(tmp_path.glob("*/*"))
    assert not (sdir / "result.yaml").exists()
    assert json.loads((sdir / "search_state.json").read_text())["iteration"] == 2
    assert cli.main(["search", f"resume={sdir}"]) == 0
    for name in ("candidates.jsonl", "result.yaml", "overrides.txt"):
        assert (sdir / name).read_text() == (searches["tiny-gpt2"] / name).read_text()


@pytest.mark.parametrize("model", ["tiny-bert"])  # the other kinds' mask states: test_mask_states_...
def test_the_label_search_finds_words(model, tmp_path):
    assert cli.main(["search", "autoprompt", f"model={model}", *SEARCH, "search.iters=1", "search.label_tokens=search",
                     "search.label_k=2", f"output_dir={tmp_path}"]) == 0
    [sdir] = list(tmp_path.glob("*/*"))
    found = json.loads((sdir / "summary.json").read_text())["found"]
    words = found["verbalizer"]
    assert list(words) == ["negative", "positive"] and all(len(w) == 2 for w in words.values())
    assert len({w for ws in words.values() for w in ws}) == 4 and all(w.isalpha() for ws in words.values() for w in ws)
    args = shlex.split((sdir / "overrides.txt").read_text())
    assert cli.main(["train", f"model={model}", *TRAIN, "method=hard-prompt", *args, f"output_dir={tmp_path}/run"]) == 0


# -- every search.* key reaches the search ---------------------------------------------------------
def ap_cfg(*extra):
    return compose_search("autoprompt", ["model=tiny-gpt2", *SEARCH, *extra])


def test_num_triggers_and_init_token_shape_the_start():
    task = tasks.build("sst2", head="verbalizer")
    assert autoprompt.trigger_template(ap_cfg("search.num_triggers=2"), task) == "{sentence} {trigger:2} {mask} ."
    assert autoprompt.start_token(ap_cfg("search.init_token='Ġa'")) == "Ġa"


def test_words_only_filters_candidates(tiny_tok):
    letters = autoprompt.allowed_tokens(tiny_tok, len(tiny_tok), True, set())
    every = autoprompt.allowed_tokens(tiny_tok, len(tiny_tok), False, set())
    assert int(letters.sum()) < int(every.sum())


def test_iters_zero_keeps_the_init_token_everywhere(tmp_path):
    assert cli.main(["search", "autoprompt", "model=tiny-gpt2", *SEARCH, "search.iters=0", "search.num_triggers=2",
                     "search.init_token='Ġa'", f"output_dir={tmp_path}"]) == 0
    [sdir] = list(tmp_path.glob("*/*"))
    assert json.loads((sdir / "summary.json").read_text())["found"]["triggers"] == ["Ġa", "Ġa"]


@pytest.mark.parametrize("extra", [["search.seed=1"], ["search.eval_batches=2"]])
def test_seed_and_eval_batches_change_what_is_scored(extra, searches, tmp_path):
    base_dir = searches["tiny-gpt2"]
    assert cli.main(["search", "autoprompt", "model=tiny-gpt2", *SEARCH, *extra, f"output_dir={tmp_path}"]) == 0
    [sdir] = list(tmp_path.glob("*/*"))
    assert (sdir / "candidates.jsonl").read_text() != (base_dir / "candidates.jsonl").read_text()


def test_label_steps_and_lr_reach_the_label_search(monkeypatch):
    seen = {"lr": None, "steps": 0}
    real = torch.optim.Adam

    class Recording(real):
        def __init__(self, params, lr):
            seen["lr"] = lr
            super().__init__(params, lr=lr)

        def step(self, *a, **kw):
            seen["steps"] += 1
            return super().step(*a, **kw)

    monkeypatch.setattr(autoprompt.torch.optim, "Adam", Recording)
    cfg = ap_cfg("search.label_tokens=search", "search.label_steps=7", "search.label_lr=0.5", "search.label_k=2")
    scorer = base.Scorer(cfg)
    autoprompt.find_label_words(cfg, scorer, scorer.variant())
    assert seen == {"lr": 0.5, "steps": 7}

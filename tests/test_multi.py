"""Mixed-adapter batches (ptune.multi, ptune.mixed): every row of a batch that mixes methods,
prompt lengths and tasks gets what its adapter gives alone. Adapters are built in-process on tiny
models with random tensors (scaled up so that adapters really differ); run directories are written
directly (config.yaml + adapter/), as a finished run leaves them, without training."""

import json

import pytest
import torch

from conftest import CAUSAL, MRS, build_pool, make_run, run_config
from ptune.infer import mixed
from ptune.cli import main
from ptune.data import collate
from ptune.errors import PtuneError
from ptune.heads.linear import class_logits
from ptune.infer.pool import Adapter, Pool, parse_runs
from ptune.build import build, build_backbone
from ptune.heads.verbalizer import slot_scores

ENCODER = {
    "lin": ["method=prompt", "method.num_virtual_tokens=3", "task=sst2"],
    "v2": ["method=p-tuning-v2", "method.num_virtual_tokens=5", "task=sst2"],
    "verb_prefix": ["method=prefix", "method.num_virtual_tokens=2", "task=sst2", "task.head=verbalizer"],
    "verb_prompt": ["method=prompt", "method.num_virtual_tokens=4", "task=sst2", "task.head=verbalizer"],
}
SENTENCES = ["a fine movie", "dull , long and the most boring film ever made", "wow", "not good at all, really not"]


@pytest.fixture(scope="module")
def causal(data_dir):
    return build_pool("tiny-llama", CAUSAL)


@pytest.fixture(scope="module")
def encoder(data_dir):
    return build_pool("tiny-bert", ENCODER)


def alone_scores(pool: Pool, row: dict) -> torch.Tensor:
    """The row's class scores from its adapter alone, batch of one (the eval/predict path)."""
    method, task = pool.alone(row["adapter"])
    tok = pool.backbone.tokenizer
    batch = collate(task.examples(tok, [{**row, "label": 0}]), tok.pad_token_id)
    with torch.no_grad():
        if task.head == "verbalizer":
            return slot_scores(method, batch)[0]
        return class_logits(method, batch["input_ids"], batch["attention_mask"])[0]


def _class_rows(names):
    return [{"adapter": names[i % len(names)], "sentence": s} for i, s in enumerate(SENTENCES * 2)]


@pytest.mark.parametrize("which", ["causal", "encoder"])
def test_class_rows_of_a_mixed_batch_equal_each_adapter_alone(which, request):
    pool = request.getfixturevalue(which)
    names = [n for n in pool.names if pool.adapters[n].head != "lm"]
    rows = _class_rows(names)  # every adapter with sentences of several lengths (right padding)
    mixed_scores = pool.class_scores(rows)
    for row, got in zip(rows, mixed_scores):
        torch.testing.assert_close(got, alone_scores(pool, row), atol=1e-5, rtol=0)
    # the adapters really differ: one sentence through two linear-head adapters scores differently
    a, b = pool.class_scores([{"adapter": "lin", "sentence": "wow"}, {"adapter": "v2", "sentence": "wow"}])
    assert (a - b).abs().max() > 1e-2


def test_rows_are_the_same_whatever_else_is_in_the_batch(causal):
    row = {"adapter": "verb_prefix", "sentence": "a fine movie"}
    alone = causal.class_scores([row])[0]
    crowd = causal.class_scores([{"adapter": "verb_prompt", "sentence": SENTENCES[1]}, row,
                                 {"adapter": "verb_prompt", "sentence": "wow"}])[1]
    torch.testing.assert_close(crowd, alone, atol=1e-5, rtol=0)


def test_generation_rows_equal_each_adapter_alone(causal):
    rows = [{"adapter": name, "mr": mr} for mr in MRS for name in ("gen_prompt", "gen_prefix")]
    texts = causal.generate(rows)  # left-padded: the MRs differ in length
    for row, text in zip(rows, texts):
        method, task = causal.alone(row["adapter"])
        assert text == task.predict(method, [{"mr": row["mr"]}], 1)[0]
    # token ids, without stopping early: the mixed greedy loop against transformers' generate()
    encoded = causal.encode(rows)
    ids, mask, adapters = causal._batch(encoded, "left")
    eos = causal.backbone.tokenizer.eos_token_id
    new = mixed.greedy(causal._methods, ids, mask, adapters, [7] * len(rows), [eos], eos)
    for e, got in zip(encoded, new):
        method = causal._methods[e["adapter"]]
        one = torch.tensor([e["ids"]])
        ref = method.generate(one, torch.ones_like(one), do_sample=False, max_new_tokens=7, eos_token_id=eos,
                              pad_token_id=eos)[0].tolist()
        assert got == ref[:len(got)] and (len(got) == 7 or got[-1] == eos)
    assert new[0] != new[1]  # one MR, two adapters: different continuations
    ids, mask, adapters = causal._batch(encoded, "right")  # the layout packs each row itself: any padding
    assert mixed.greedy(causal._methods, ids, mask, adapters, [7] * len(rows), [eos], eos) == new


@pytest.mark.parametrize("which", ["causal", "encoder"])
def test_each_row_is_packed_prompt_then_tokens(which, request):
    """A batch is as wide as its widest row's own prompt + tokens, not longest prompt + longest row."""
    pool = request.getfixturevalue(which)
    lengths = {"lin": 9, "verb_prompt": 2, "verb_prefix": 6}  # prompt 3, prompt 4, prefix (causal 5, encoder 2)
    names = list(lengths)
    ids = torch.full((3, 9), 7)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths.values()):
        ids[r, :n] = torch.arange(10, 10 + n)
        mask[r, :n] = 1
    adapters = torch.tensor([pool.index(n) for n in names])
    got = mixed.mixed_inputs(pool._methods, ids, mask, adapters)
    methods = [pool._methods[a] for a in adapters.tolist()]
    q = [m.num_virtual_tokens if mixed.side_of(m) == "input" else 0 for m in methods]
    width = max(a + n for a, n in zip(q, lengths.values()))
    assert width == 3 + 9 < 4 + 9  # the old layout: longest prompt + longest row
    pk = methods[2].num_virtual_tokens
    assert got.inputs["inputs_embeds"].shape[:2] == (3, width)
    assert got.inputs["attention_mask"].shape == (3, pk + width)
    for r, (m, n) in enumerate(zip(methods, lengths.values())):
        start = width - q[r] - n if which == "causal" else 0
        row = got.inputs["attention_mask"][r, pk:]
        assert row.tolist() == [int(start <= c < start + q[r] + n) for c in range(width)]
        assert got.inputs["attention_mask"][r, :pk].sum() == (m.num_virtual_tokens if r == 2 else 0)
        pos = got.inputs["position_ids"][r, start:start + q[r] + n]
        assert pos.tolist() == list(range(q[r])) + list(range(m.num_virtual_tokens, m.num_virtual_tokens + n))
        if q[r]:
            torch.testing.assert_close(got.inputs["inputs_embeds"][r, start:start + q[r]], m.soft_prompt().detach())
        assert got.columns[r, :n].tolist() == list(range(start + q[r], start + q[r] + n))


def test_predict_answers_every_row_in_order(causal):
    rows = [{"adapter": "gen_prefix", "mr": MRS[0]}, {"adapter": "lin", "sentence": "wow"},
            {"adapter": "verb_prompt", "sentence": SENTENCES[1]}, {"adapter": "gen_prompt", "mr": MRS[1]}]
    got = causal.predict(rows, batch_size=3)
    for row, answer in zip(rows, got):
        method, task = causal.alone(row["adapter"])
        assert answer == task.predict(method, [{k: v for k, v in row.items() if k != "adapter"}], 4)[0]


def test_info_lists_each_adapter(causal):
    info = {a["name"]: a for a in causal.info()}
    assert info["verb_prefix"] == {"name": "verb_prefix", "method": "prefix", "task": "sst2", "head": "verbalizer",
                                   "prompt_length": 5, "run": None, "labels": ["negative", "positive"],
                                   "fields": ["sentence"]}
    assert info["gen_prompt"]["fields"] == ["mr"] and "labels" not in info["gen_prompt"]


@pytest.mark.parametrize("rows, message", [
    ([{"adapter": "nope", "sentence": "x"}], "unknown adapter 'nope'; this pool serves: lin, v2"),
    ([{"sentence": "x"}], "input 0 names no adapter"),
    ([{"adapter": "lin", "text": "x"}], "input 0 (adapter 'lin', task sst2) needs a text field 'sentence'"),
    ([{"adapter": "gen_prompt", "mr": 3}], "needs a text field 'mr'"),
    (["just a string"], "input 0 is not an object"),
])
def test_bad_rows_are_one_line_errors(causal, rows, message):
    with pytest.raises(PtuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        causal.predict(rows)


def test_what_cannot_share_a_backbone_is_refused(causal, encoder):
    cfg = run_config("tiny-llama", ["method=fine-tune", "task=sst2"])
    _, method, task = build(cfg, causal.backbone)
    with pytest.raises(PtuneError, match="method=fine-tune cannot share a frozen backbone"):
        Pool(causal.backbone, {"ft": Adapter("ft", method, task)})
    lin = causal.adapters["lin"]
    with pytest.raises(PtuneError, match="built on another backbone"):
        Pool(encoder.backbone, {"lin": lin})
    with pytest.raises(PtuneError, match="class_scores takes classification rows"):
        causal.class_scores([{"adapter": "gen_prompt", "mr": "name[X]"}])
    _, method, task = build(run_config("tiny-llama", ["method=prompt", "task=lama"]), causal.backbone)
    with pytest.raises(PtuneError, match="task.head=vocab is not served by several-run predict"):  # HeadKind.served
        Pool(causal.backbone, {"lama": Adapter("lama", method, task)})


def test_parse_runs():
    assert parse_runs("outputs/a,outputs/b") == {"a": "outputs/a", "b": "outputs/b"}
    assert parse_runs("sst2:outputs/a, e2e:/x/b") == {"sst2": "outputs/a", "e2e": "/x/b"}
    with pytest.raises(PtuneError, match="names the adapter 'a' twice"):
        parse_runs("x/a,y/a")
    with pytest.raises(PtuneError, match="run= is empty"):
        parse_runs(",")


# -- run directories: Pool.load and `ptune predict run=a,b` ----------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("runs")
    return {name: make_run(root / name, "tiny-llama", CAUSAL[name], i)
            for i, name in enumerate(("lin", "verb_prefix", "gen_prefix"))}


def test_load_shares_one_backbone_and_matches_single_run_predict(runs):
    pool = Pool.load({name: str(path) for name, path in runs.items()})
    assert all(a.method.backbone is pool.backbone for a in pool.adapters.values())
    rows = [{"adapter": "gen_prefix", "mr": MRS[0]}, {"adapter": "lin", "sentence": "wow"},
            {"adapter": "verb_prefix", "sentence": SENTENCES[1]}]
    answers = pool.predict(rows)
    for row, answer in zip(rows, answers):
        method, task = pool.alone(row["adapter"])
        assert answer == task.predict(method, [{k: v for k, v in row.items() if k != "adapter"}], 1)[0]
    alone = Pool.load([str(runs["gen_prefix"])])  # the generation run by itself, on its own backbone
    assert alone.predict([{"mr": MRS[0]}]) == answers[:1]


def test_load_refuses_runs_on_different_backbones(runs, tmp_path):
    other = make_run(tmp_path / "gpt", "tiny-gpt2", CAUSAL["lin"], 0)
    with pytest.raises(PtuneError, match="runs must share one backbone: .*gpt has model.name='tiny-gpt2'"):
        Pool.load([str(runs["lin"]), str(other)])


def test_cli_predict_with_several_runs(runs, tmp_path, capsys):
    rows = [{"adapter": "gen", "mr": MRS[1]}, {"adapter": "sst2", "sentence": "wow", "id": 7}]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    spec = f"sst2:{runs['lin']},gen:{runs['gen_prefix']}"
    assert main(["predict", f"run={spec}", f"input={inputs}", f"output={out}"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "prediction"} for g in got] == rows  # fields kept, in order
    pool = Pool.load({"sst2": str(runs["lin"]), "gen": str(runs["gen_prefix"])})
    assert [g["prediction"] for g in got] == pool.predict(rows)
    inputs.write_text(json.dumps({"adapter": "nope", "sentence": "x"}) + "\n")
    assert main(["predict", f"run={spec}", f"input={inputs}", f"output={out}"]) == 2
    assert "error: unknown adapter 'nope'; this pool serves: sst2, gen" in capsys.readouterr().err


# -- real weights (pytest -m slow): SmolLM2-135M and MiniLM, adapters at their own initialisation ----
REAL = {
    "smollm2-135m": {"verb": ["method=prompt", "method.num_virtual_tokens=20", "task=sst2", "task.head=verbalizer"],
                     "lin": ["method=prefix", "method.num_virtual_tokens=10", "task=sst2"],
                     "gen": ["method=p-tuning-v2", "method.num_virtual_tokens=5", "task=e2e", "task.max_new_tokens=12"],
                     "gen2": ["method=prompt", "method.num_virtual_tokens=8", "task=e2e", "task.max_new_tokens=12"]},
    "minilm": {"lin": ["method=prompt", "method.num_virtual_tokens=20", "task=sst2"],
               "v2": ["method=p-tuning-v2", "method.num_virtual_tokens=8", "task=sst2"]},
}


@pytest.mark.slow
@pytest.mark.parametrize("model", list(REAL))
def test_real_backbones_mixed_equals_alone(model, data_dir):
    backbone, adapters = None, {}
    for name, overrides in REAL[model].items():
        cfg = run_config(model, overrides)
        backbone = backbone or build_backbone(cfg)
        _, method, task = build(cfg, backbone)
        adapters[name] = Adapter(name, method, task)
    pool = Pool(backbone, adapters)
    names = [n for n in pool.names if pool.adapters[n].head != "lm"]
    rows = _class_rows(names)
    worst = max((got - alone_scores(pool, row)).abs().max().item() for row, got in zip(rows, pool.class_scores(rows)))
    print(f"{model}: largest difference of a class score, mixed vs alone: {worst:.2e}")
    assert worst < 1e-4
    if "gen" in pool.adapters:
        rows = [{"adapter": name, "mr": mr} for mr in MRS for name in ("gen", "gen2")]
        texts = pool.generate(rows)
        print(texts)
        for row, text in zip(rows, texts):
            method, task = pool.alone(row["adapter"])
            assert text == task.predict(method, [{"mr": row["mr"]}], 1)[0]


def test_seq2seq_pools_answer_adapter_by_adapter(data_dir):
    pool = build_pool("tiny-t5", {"lin": CAUSAL["lin"], "gen": CAUSAL["gen_prefix"]})
    rows = [{"adapter": "gen", "mr": MRS[0]}, {"adapter": "lin", "sentence": "wow"}, {"adapter": "gen", "mr": MRS[1]}]
    for row, answer in zip(rows, pool.predict(rows)):
        method, task = pool.alone(row["adapter"])
        assert answer == task.predict(method, [{k: v for k, v in row.items() if k != "adapter"}], 1)[0]
    with pytest.raises(PtuneError, match="model=tiny-t5 is seq2seq"):
        pool.class_scores(rows[1:2])

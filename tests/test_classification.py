"""Classification with a linear head (task=sst2): accuracy, pooling per backbone kind, the loss,
the head in adapters and checkpoints, and the CLI end to end on tiny models."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import crash_after_checkpoint
from ptune.adapter import save_adapter, load_adapter
from ptune import tasks
from ptune.cli import compose, main
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.heads.linear import LinearHead, class_logits, class_loss, pool
from ptune.tasks.classification import accuracy
from ptune.adapter import adapter_tensors, load_adapter_tensors
from ptune.build import build

# Small sst2 runs: 64 training sentences, 16 dev sentences, two steps.
SMALL = ["task=sst2", "task.max_train_samples=64", "task.max_eval_samples=16", "trainer.batch_size=8",
         "trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2", "trainer.log_every=1",
         "trainer.eval_batch_size=8"]
SENTENCES = ["a gorgeous , witty , seductive movie .", "dull",
             "the plot is nothing but boilerplate clichés from start to finish ,"]


def setup(*overrides):
    """(backbone, method, task) as `ptune train` builds them, head attached."""
    return build(compose(["task=sst2", *overrides]))


def batch_of(tok, texts, side="right", labels=None):
    labels = labels or [0] * len(texts)
    exs = [Example(tok(t).input_ids, [y], "class") for t, y in zip(texts, labels)]
    return collate(exs, tok.pad_token_id, padding_side=side)


# -- the metric and the data -------------------------------------------------------------------
def test_accuracy_on_hand_made_inputs():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy([0, 0, 0], [0, 0, 0]) == 1.0
    assert accuracy([2], [1]) == 0.0
    assert accuracy([1, 0, 1], [1, 0, 0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError):
        accuracy([], [])


def test_sst2_rows_examples_and_labels(data_dir):
    backbone, _, task = setup("model=tiny-bert", "method=fine-tune", "task.max_len=8")
    dev = task.rows("dev")
    assert len(dev) == 872 and sum(r["label"] for r in dev) == 444  # GLUE's dev: 444 positive, 428 negative
    assert dev[0] == {"sentence": "it 's a charming and often affecting journey .", "label": 1}  # trailing space gone
    assert task.label_words() == ["negative", "positive"] and task.metric_for_best == "accuracy"
    task.max_train_samples = 5
    exs = task.train_examples(backbone.tokenizer, "masked")
    assert len(exs) == 5 and all(e.layout == "class" and e.labels in ([0], [1]) for e in exs)
    # the tokenizer's own special tokens, truncated to task.max_len
    assert all(e.input_ids[0] == 101 and e.input_ids[-1] == 102 and len(e.input_ids) <= 8 for e in exs)
    with pytest.raises(PtuneError, match="use split=dev"):
        task.rows("test")


def test_template_and_head_errors_name_the_key(data_dir):
    def sst2(**kw):
        return tasks.build("sst2", **kw)

    with pytest.raises(PtuneError, match=r"task.template='Review: \{text\}' names the field 'text'.*use \{sentence\}"):
        sst2(template="Review: {text}")
    with pytest.raises(PtuneError, match="task.template='{sentence' has an unmatched"):
        sst2(template="{sentence")
    with pytest.raises(PtuneError, match="task.head=lm generates text"):
        sst2(head="lm")
    with pytest.raises(PtuneError, match="task.head='mlp' is not one of"):
        sst2(head="mlp")
    with pytest.raises(PtuneError, match="task.head_dropout=1.5 is invalid"):
        sst2(head_dropout=1.5)
    task = sst2(template="Review: {sentence} Sentiment:")
    assert task.text({"sentence": "dull", "label": 0}) == "Review: dull Sentiment:"
    with pytest.raises(PtuneError, match="method=fine-tune method.trainable=head"):
        setup("model=tiny-llama", "method=hard-prompt")
    with pytest.raises(PtuneError, match="task=e2e generates text"):
        build(compose(["model=tiny-bert", "method=fine-tune", "task=e2e"]))


# -- the head ------------------------------------------------------------------------------------
def test_linear_head_init_is_bert_like_and_leaves_the_global_rng_alone():
    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    head = LinearHead(768, 2, dropout=0.1, seed=42)
    assert torch.equal(torch.rand(3), expected_next)  # the head drew from its own generator
    assert torch.equal(head.weight, LinearHead(768, 2, seed=42).weight)
    assert not torch.equal(head.weight, LinearHead(768, 2, seed=43).weight)
    assert head.weight.std().item() == pytest.approx(0.02, rel=0.1) and not head.bias.any()
    assert dict(head.named_parameters()).keys() == {"weight", "bias"}


# -- pooling: the right position under left and right padding ------------------------------------
def hidden_alone(method, ids):
    """The hidden state each kind pools, for one unpadded example, computed without ptune.heads."""
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    model, kind = method.backbone.model, method.backbone.kind
    if kind == "seq2seq":
        inputs = method.model_inputs(x, mask)
        embeds = inputs.get("inputs_embeds")
        enc = model.get_encoder()(input_ids=None if embeds is not None else x, inputs_embeds=embeds,
                                  attention_mask=inputs["attention_mask"]).last_hidden_state
        start = torch.tensor([[model.config.decoder_start_token_id]])
        return model.get_decoder()(input_ids=start, encoder_hidden_states=enc,
                                   encoder_attention_mask=inputs["attention_mask"]).last_hidden_state[0, 0]
    hidden = model.base_model(**method.model_inputs(x, mask)).last_hidden_state[0]  # (n_prepended + seq, hidden)
    return hidden[-1] if kind == "causal" else hidden[method.n_prepended]  # last token / [CLS]


CASES = {  # per backbone kind, a method that prepends nothing and one that prepends 3 positions
    "causal, nothing prepended": ["model=tiny-llama", "method=fine-tune", "method.trainable=head"],
    "causal, prompt": ["model=tiny-gpt2", "method=prompt", "method.num_virtual_tokens=3"],
    "masked, nothing prepended": ["model=tiny-bert", "method=fine-tune", "method.trainable=head"],
    "masked, prompt": ["model=tiny-bert", "method=prompt", "method.num_virtual_tokens=3"],
    "seq2seq, nothing prepended": ["model=tiny-bart", "method=fine-tune", "method.trainable=head"],
    "seq2seq, prompt": ["model=tiny-t5", "method=prompt", "method.num_virtual_tokens=3"],
}
_built = {}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_picks_the_same_token_alone_and_in_a_padded_batch(case, side):
    if case not in _built:  # built once for both sides; nothing here changes the method
        _built[case] = setup(*CASES[case])
    backbone, m, _ = _built[case]
    tok = backbone.tokenizer
    batch = batch_of(tok, SENTENCES, side)
    assert batch["attention_mask"].sum(-1).unique().numel() == 3  # three lengths: every row but one is padded
    with torch.no_grad():
        pooled = pool(m, batch["input_ids"], batch["attention_mask"])  # (3, hidden)
        for i, text in enumerate(SENTENCES):
            torch.testing.assert_close(pooled[i], hidden_alone(m, tok(text).input_ids), atol=1e-5, rtol=1e-5)
        if backbone.kind != "seq2seq":  # the test can fail: a padded row's neighbouring position differs
            inputs = m.model_inputs(batch["input_ids"], batch["attention_mask"])
            hidden = backbone.model.base_model(**inputs).last_hidden_state[:, m.n_prepended:]  # (3, seq, hidden)
            short = int(batch["attention_mask"].sum(-1).argmin())
            wrong = hidden[short, -1] if side == "right" else hidden[short, 0]  # a pad, where a naive index would look
            assert not torch.allclose(pooled[short], wrong, atol=1e-3)


# -- the loss --------------------------------------------------------------------------------------
def test_class_loss_equals_a_hand_computation_and_dropout_follows_the_backbone():
    backbone, m, _ = setup("model=tiny-llama", "method=prompt", "method.num_virtual_tokens=3", "task.head_dropout=0.5")
    with torch.no_grad():
        m.head.weight.normal_(0, 1.0)  # logits far from uniform, so the comparison means something
        m.head.bias.copy_(torch.tensor([0.3, -0.2]))
    batch = batch_of(backbone.tokenizer, SENTENCES, labels=[1, 0, 1])
    backbone.model.eval()
    loss, n = class_loss(m, **batch)
    assert n == 3
    with torch.no_grad():
        h = pool(m, batch["input_ids"], batch["attention_mask"])  # (3, hidden)
        expected = 0.0
        for i, y in enumerate([1, 0, 1]):
            z = [float(h[i] @ m.head.weight[c] + m.head.bias[c]) for c in range(2)]
            expected += math.log(sum(math.exp(v) for v in z)) - z[y]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(class_logits(m, batch["input_ids"], batch["attention_mask"]),
                       class_logits(m, batch["input_ids"], batch["attention_mask"]))  # eval: no dropout
    backbone.model.train()  # as the trainer does: head dropout (p=0.5) is now active too
    torch.manual_seed(0)
    a = class_logits(m, batch["input_ids"], batch["attention_mask"])
    assert m.head.training and not torch.equal(a, class_logits(m, batch["input_ids"], batch["attention_mask"]))


@pytest.mark.parametrize("model, method, lr", [
    ("tiny-llama", ["method=prompt", "method.num_virtual_tokens=3"], 3e-2),
    ("tiny-llama", ["method=fine-tune", "method.trainable=head"], 3e-2),  # the linear probe: the head alone trains
    ("tiny-bert", ["method=fine-tune"], 3e-3),  # BERT fine-tuning: every weight but the unused MLM head
])
def test_only_the_method_and_head_get_gradients_and_loss_falls(data_dir, model, method, lr):
    backbone, m, task = setup(f"model={model}", *method, "task.max_train_samples=8")
    trained = m.trainable_tensors()
    assert {"head.weight", "head.bias"} <= set(trained)
    trained_ids = {id(p) for p in trained.values()}
    if method == ["method=fine-tune", "method.trainable=head"]:
        assert set(trained) == {"head.weight", "head.bias"}
    if model == "tiny-bert":  # the MLM head is not the output any more: nothing of it trains
        assert not any(k.startswith("cls.") for k in trained)
    frozen = {k: v.clone() for k, v in backbone.model.named_parameters() if id(v) not in trained_ids}
    batch = collate(task.train_examples(backbone.tokenizer, backbone.kind), backbone.tokenizer.pad_token_id)
    opt = torch.optim.AdamW(trained.values(), lr=lr)
    backbone.model.train()
    losses = []
    for _ in range(12):
        loss, n = class_loss(m, **batch)
        (loss / n).backward()
        assert all(p.grad is None for p in backbone.model.parameters() if id(p) not in trained_ids)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    # 8 sentences: memorised. (A random tiny BERT's [CLS] barely differs between sentences, std
    # 0.008 against 1.0 overall, so a frozen BERT's head alone cannot: its case trains the backbone.)
    assert losses[-1] < losses[0] - 0.4, losses
    for k, v in backbone.model.named_parameters():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"frozen weight {k} changed"


def test_adapter_holds_the_head_and_reloads_to_identical_logits(tmp_path):
    backbone, m, _ = setup("model=tiny-llama", "method=prompt", "method.num_virtual_tokens=3")
    with torch.no_grad():
        for p in m.trainable_tensors().values():
            p.add_(torch.randn_like(p) * 0.1)
    tensors = adapter_tensors(m)
    assert set(tensors) == {"prompt", "head.weight", "head.bias"} and tensors["head.weight"].shape == (2, 64)
    save_adapter(tmp_path, tensors, {})
    fresh, m2, _ = setup("model=tiny-llama", "method=prompt", "method.num_virtual_tokens=3", "trainer.seed=7")
    load_adapter_tensors(m2, load_adapter(tmp_path)[1])
    batch = batch_of(backbone.tokenizer, SENTENCES)
    with torch.no_grad():
        assert torch.equal(class_logits(m, **{k: batch[k] for k in ("input_ids", "attention_mask")}),
                           class_logits(m2, **{k: batch[k] for k in ("input_ids", "attention_mask")}))
    _, m3, _ = setup("model=tiny-llama", "method=prompt", "method.num_virtual_tokens=3")
    with pytest.raises(PtuneError, match="holds no linear head"):
        load_adapter_tensors(m3, {"prompt": tensors["prompt"]})
    with pytest.raises(PtuneError, match=r"head.weight has shape \(3, 64\)"):
        load_adapter_tensors(m3, {**tensors, "head.weight": torch.zeros(3, 64), "head.bias": torch.zeros(3)})


# -- the CLI end to end --------------------------------------------------------------------------------
def run_dir(root):
    [run] = [p for p in (root / "outputs").glob("*/*") if (p / "summary.json").exists()]
    return run


@pytest.mark.parametrize("model, method, own", [
    ("tiny-llama", ["method=prompt", "method.num_virtual_tokens=4"], {"prompt"}),
    ("tiny-bert", ["method=p-tuning-v2", "method.num_virtual_tokens=4"], {"prefix"}),  # the paper's setting
    ("tiny-t5", ["method=prompt", "method.num_virtual_tokens=4"], {"prompt"}),
])
def test_cli_train_eval_predict(in_tmp, data_dir, capsys, model, method, own):
    assert main(["train", f"model={model}", *method, *SMALL]) == 0
    run = run_dir(in_tmp)
    assert "sst2 dev accuracy:" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric_for_best"] == "accuracy" and set(summary["eval"]) == {"accuracy"}
    assert summary["eval"]["accuracy"] in {k / 16 for k in range(17)}  # 16 dev sentences
    tensors = load_file(run / "adapter/adapter_model.safetensors")
    assert tensors["head.weight"].shape == (2, 64) and tensors["head.bias"].shape == (2,)
    assert set(tensors) == own | {"head.weight", "head.bias"}
    assert summary["stored_params"] == sum(t.numel() for t in tensors.values())
    assert {"head.weight", "head.bias"} <= set(load_file(run / "checkpoints/step-2/trainable.safetensors"))
    config = json.loads((run / "adapter/adapter_config.json").read_text())
    assert config["head"]["labels"] == ["negative", "positive"]
    records = [json.loads(line) for line in (run / "predictions/dev.jsonl").read_text().splitlines()]
    assert len(records) == 16 and set(records[0]) == {"text", "label", "prediction"}
    assert sum(r["label"] == r["prediction"] for r in records) / 16 == summary["eval"]["accuracy"]

    assert main(["eval", f"run={run}"]) == 0  # a fresh backbone + the saved adapter: the same accuracy
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == summary["eval"]
    rows = in_tmp / "rows.jsonl"
    rows.write_text("".join(json.dumps({"sentence": s}) + "\n" for s in SENTENCES))
    assert main(["predict", f"run={run}", f"input={rows}", f"output={in_tmp / 'p.jsonl'}"]) == 0
    preds = [json.loads(line) for line in (in_tmp / "p.jsonl").read_text().splitlines()]
    assert [p["sentence"] for p in preds] == SENTENCES
    assert all(p["prediction"] in ("negative", "positive") for p in preds)
    rows.write_text(json.dumps({"text": "no sentence field"}) + "\n")
    assert main(["predict", f"run={run}", f"input={rows}"]) == 2
    assert "needs a 'sentence' field" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["trainer.head_lr=0.3"]])  # head_lr: two optimizer groups, saved by name
def test_resume_restores_the_head_bit_for_bit(in_tmp, data_dir, monkeypatch, extra):
    args = ["train", "model=tiny-llama", "method=prompt", "method.num_virtual_tokens=4", *SMALL, "trainer.save_every=1",
            *extra]
    assert main(args) == 0
    full = run_dir(in_tmp)
    restore = crash_after_checkpoint(monkeypatch, 1)  # "kill" the run right after its step-1 checkpoint
    assert main(args) == 130
    restore()
    [broken] = [p for p in (in_tmp / "outputs").glob("*/*") if p != full]
    assert {"head.weight", "head.bias"} <= set(load_file(broken / "checkpoints/step-1/trainable.safetensors"))
    assert main(["train", f"resume={broken}"]) == 0
    a, b = (load_file(r / "adapter/adapter_model.safetensors") for r in (full, broken))
    assert a.keys() == b.keys() == {"prompt", "head.weight", "head.bias"} and all(torch.equal(a[k], b[k]) for k in a)


# -- keys that only some heads (or modes) read: refused elsewhere, never ignored -------------------
# A value away from conf/task's default for every key one head alone reads (heads.HEAD_KEYS).
CHANGED = {"head_dropout": 0.3, "proto_dim": 8, "proto_combine": True, "kpt_words": "words.yaml", "kpt_neighbours": 3,
           "kpt_prior_rows": 5, "kpt_threshold": None, "kpt_relevance": None, "kpt_calibrate": False,
           "kpt_aggregate": "weighted", "slots": {"mask": {"neg": "bad", "pos": "good"}},
           "rules": {"negative": {"mask": "neg"}, "positive": {"mask": "pos"}}}
RULES = {"template": "{sentence} {mask:a}", "slots": {"a": {"neg": "bad", "pos": "good"}},
         "rules": {"negative": {"a": "neg"}, "positive": {"a": "pos"}}}


def test_changed_covers_every_head_key_and_every_task_file_holds_them():
    from ptune.config import group_defaults
    from ptune.heads import HEAD_KEYS, HEADS

    assert set(CHANGED) == set(HEAD_KEYS) == {k for kind in HEADS.values() for k in kind.keys}
    for name in ("sst2", "cb", "rte", "boolq", "custom"):
        defaults = group_defaults("task", name)
        assert all(key in defaults and defaults[key] != CHANGED[key] for key in HEAD_KEYS), name


@pytest.mark.parametrize("head", ["linear", "verbalizer", "soft-verbalizer", "proto-verbalizer", "knowledgeable",
                                  "rules"])
def test_a_key_another_head_reads_is_refused_and_its_own_keys_are_taken(data_dir, head):
    from ptune.heads import HEADS

    base = {"head": head, **(RULES if head == "rules" else {})}
    for key, value in CHANGED.items():
        readers = [n for n, k in HEADS.items() if key in k.keys]
        if head in readers:
            if key not in ("slots", "rules"):  # the rules head's own keys: tests/test_kpt_ptr.py
                tasks.build("sst2", **base, **{key: value})
            continue
        with pytest.raises(PtuneError) as e:
            tasks.build("sst2", **base, **{key: value})
        message = str(e.value)
        assert f"task.{key}" in message and f"use task.head={readers[0]}" in message and "\n" not in message, message


def test_label_words_few_shot_seed_and_demo_encoder_are_refused_where_nothing_reads_them(data_dir):
    words = {"negative": "bad", "positive": "good"}
    for head in ("linear", "rules"):
        with pytest.raises(PtuneError, match=f"task.verbalizer gives words per class, and task.head={head} scores no "
                                             f"label words; use task.head=verbalizer or"):
            tasks.build("sst2", head=head, verbalizer=words, **(RULES if head == "rules" else {}))
    assert tasks.build("sst2", head="linear", verbalizer={"negative": "terrible", "positive": "great"})  # the default
    assert tasks.build("sst2", head="verbalizer", verbalizer=words).verbalizer
    with pytest.raises(PtuneError, match="task.few_shot_seed=21 chooses the K-shot split, and task.few_shot=null"):
        tasks.build("sst2", few_shot_seed=21)
    assert tasks.build("sst2", few_shot=4, few_shot_seed=21).few_shot_seed == 21
    for mode in (None, "random"):
        with pytest.raises(PtuneError, match=f"task.demo_encoder=bert chooses demonstrations by similarity, and "
                                             f"task.demonstrations={mode or 'null'} does not"):
            tasks.build("sst2", head="verbalizer", demonstrations=mode, demo_encoder="bert")


def test_custom_refuses_the_other_types_keys(in_tmp):
    from ptune.config import group_defaults
    from ptune.tasks.custom import CLASSIFICATION_KEYS, GENERATION_KEYS

    (in_tmp / "t.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    files = {"train_file": "t.csv", "eval_file": "t.csv"}
    other = {"head": "verbalizer", "labels": ["neg", "pos"], "verbalizer": {"neg": "bad"}, "triggers": ["x"],
             "few_shot": 1, "few_shot_seed": 21, "demonstrations": "random", "demo_sets": 2, "demo_encoder": "bert",
             "calibrate": True, **CHANGED}
    defaults = group_defaults("task", "custom")
    assert set(other) == set(CLASSIFICATION_KEYS) and all(defaults[k] != v for k, v in other.items())
    for key, value in other.items():
        with pytest.raises(PtuneError, match=f"task.{key}"):
            tasks.build("custom", type="generation", **files, **{key: value})
    for key, value in {"max_target_len": 8, "max_new_tokens": 8}.items():
        assert key in GENERATION_KEYS and defaults[key] != value
        with pytest.raises(PtuneError, match=f"task.{key}=8 is read by task.type=generation alone"):
            tasks.build("custom", **files, **{key: value})
        assert tasks.build("custom", type="generation", **files, **{key: value})
    with pytest.raises(PtuneError, match="task.data_dir=data: task=custom reads task.train_file"):
        tasks.build("custom", data_dir="data", **files)


def test_an_unread_key_on_the_command_line_is_one_line_and_writes_nothing(in_tmp, data_dir, capsys):
    assert main(["train", "model=tiny-bert", "task=sst2", "method=prompt", "task.head=verbalizer",
                 "task.kpt_neighbours=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: task.kpt_neighbours=3 is read by task.head=knowledgeable alone, and task.head=verbalizer "
                   "would ignore it; use task.head=knowledgeable, or leave task.kpt_neighbours=10")
    assert not (in_tmp / "outputs").exists()

"""Level 2 and 4: encoder-decoder backbones (tiny T5, tiny BART) with hard-prompt and fine-tune: the
seq2seq loss and batched text generation, E2E as seq2seq examples, fine-tune's selection of tensors
on them and on a masked backbone (BERT) with the task's linear head. What every method proves on
every backbone (frozen weights, a falling loss, the adapter round trip, padding, greedy and beam):
test_contract.py; the tie of a loaded fine-tuned head: test_fine_tune.py."""

import copy
import json

import pytest
import torch

from conftest import LAYOUT, TINY, expected_names, load
from ptune.adapter import save_adapter, load_adapter
from ptune import methods, tasks
from ptune.cli import main
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.generate import encode_sources, generate_texts, special_wrap
from ptune.heads.linear import LinearHead, class_logits
from ptune.heads.lm import seq2seq_loss
from ptune.heads import loss as head_loss

BACKBONES = ["tiny-t5", "tiny-bart"]


def fine_tune(backbone, trainable="all", k=2):
    return methods.build("fine-tune", backbone, trainable=trainable, k=k)


def toy_examples(tok, sources=("name : Eagle | food : French", "name : Mill", "name : Punter | area : riverside"),
                 targets=("The Eagle serves French food.", "The Mill.", "Punter is by the river, near a bridge.")):
    src = encode_sources(tok, list(sources), 64, "seq2seq")
    return [Example(s, tok(t).input_ids + [tok.eos_token_id], "seq2seq") for s, t in zip(src, targets)]


# -- the seq2seq loss ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_loss_equals_the_models_own(name):
    """Summed CE over label tokens == model(labels=...).loss x count, with T5's output rescaling and
    a non-zero BART final_logits_bias (zero at init, which would hide a missing bias)."""
    bb = load(name)
    if hasattr(bb.model, "final_logits_bias"):
        bb.model.final_logits_bias.normal_()
    assert bool(getattr(bb.model.config, "scale_decoder_outputs", False)) == (name == "tiny-t5")
    batch = collate(toy_examples(bb.tokenizer), bb.tokenizer.pad_token_id)
    assert (batch["labels"] == -100).any()  # targets of different lengths: padding is ignored
    for m in (methods.build("hard-prompt", bb), fine_tune(bb)):
        with torch.no_grad():
            ours, n = seq2seq_loss(m, **batch)
            ref = bb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        assert n == int((batch["labels"] != -100).sum()) == sum(e.n_loss_terms() for e in toy_examples(bb.tokenizer))
        torch.testing.assert_close(ours, ref.loss * n, rtol=1e-6, atol=1e-4)
        assert head_loss(m, batch)[0].item() == ours.item()  # the trainer's dispatch takes this path


# -- E2E as seq2seq examples -----------------------------------------------------------------------
def bart_like(tok):
    """The tiny models' tokenizer, made to wrap text in <s> ... </s> as BART's does."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tok)
    b, e = tok.bos_token, tok.eos_token
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{b} $A {e}", special_tokens=[(b, tok.bos_token_id), (e, tok.eos_token_id)])
    return tok


def test_e2e_examples_per_backbone_kind(data_dir):
    tok = load("tiny-t5").tokenizer
    task = tasks.build("e2e", data_dir=str(data_dir), max_train_samples=8, max_source_len=20, max_target_len=5)
    causal = task.train_examples(tok)  # unchanged default: one sequence, loss on " ref <eos>"
    assert all(e.layout == "causal" and e.labels[len(e.labels) - len(e.input_ids):][0] == -100 for e in causal)
    s2s = task.train_examples(tok, "seq2seq")
    assert all(e.layout == "seq2seq" and e.labels[-1] == tok.eos_token_id and -100 not in e.labels for e in s2s)
    for c, s in zip(causal, s2s):
        n_src = sum(1 for t in c.labels if t == -100)
        assert s.input_ids == c.input_ids[:n_src]  # the same source (no special tokens to add here)
        assert len(s.labels) <= 5 + 1
    # a tokenizer that wraps text (BART: <s> ... </s>) wraps both sides; truncation keeps the markers
    wrapped = bart_like(tok)
    assert special_wrap(wrapped) == ([tok.bos_token_id], [tok.eos_token_id])
    for e in task.train_examples(wrapped, "seq2seq"):
        assert e.input_ids[0] == e.labels[0] == tok.bos_token_id and e.input_ids[-1] == e.labels[-1] == tok.eos_token_id
        assert len(e.input_ids) <= 20 and e.labels.count(tok.eos_token_id) == 1
    with pytest.raises(PtuneError, match="model.kind=masked cannot"):
        task.train_examples(tok, "masked")


# -- fine-tune: which tensors train ----------------------------------------------------------------
@pytest.mark.parametrize("trainable, k", [("all", 2), ("head", 2), ("top-k", 1), ("top-k", 2)])
def test_parameter_counts(backbone, trainable, k):
    model, d = backbone.model, backbone.dims
    m = fine_tune(backbone, trainable, k)
    blocks_path, norm_path = LAYOUT[backbone.name]
    norm = sum(p.numel() for p in model.get_submodule(norm_path).parameters()) if norm_path else 0
    count = {
        "all": sum(p.numel() for p in model.parameters()),  # the shared matrix counted once
        "head": model.config.vocab_size * d.hidden,  # tied to `shared`; no bias
        "top-k": sum(p.numel() for p in model.get_submodule(blocks_path)[-k:].parameters()) + norm
        + model.config.vocab_size * d.hidden,
    }[trainable]
    trained = m.trainable_tensors()
    assert sum(p.numel() for p in trained.values()) == count
    assert set(trained) == expected_names(backbone, trainable, k)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trained)
    assert not any(n.startswith(("encoder.block", "model.encoder.layers")) for n in trained) or trainable == "all"
    stored = m.adapter_tensors()
    buffers = {n for n, _ in model.named_buffers()}  # BART's final_logits_bias: in a full checkpoint only
    assert set(stored) == set(trained) | (buffers if trainable == "all" else set())
    assert "lm_head.weight" not in stored  # tied: stored once, under the shared embedding's name


# -- generation -------------------------------------------------------------------------------------
def test_generate_texts_batched_equals_one_by_one(backbone):
    """Right-padded sources in a batch give each row the text it gets alone (BART included, whose
    encoder positions would shift under left padding)."""
    m = fine_tune(load(backbone.name))
    torch.manual_seed(0)
    with torch.no_grad():  # away from the init, whose BART repeats its start token (decoded: "")
        for p in m.trainable_tensors().values():
            p.add_(torch.randn_like(p) * 0.2)
    sources = ["Table: name : Eagle | food : French\nText:", "Table: name : Mill\nText:",
               "Table: name : Punter | area : riverside | priceRange : cheap\nText:"]
    batched = generate_texts(m, sources, batch_size=3, max_new_tokens=6)
    assert batched == [generate_texts(m, [s], batch_size=1, max_new_tokens=6)[0] for s in sources]
    assert all(batched) and len(set(batched)) == 3  # three different, non-empty texts


def test_hard_prompt_and_fine_tune_refuse_what_they_cannot_do():
    bert = load("tiny-bert")
    methods.build("hard-prompt", bert)  # builds: with task.head=verbalizer it is BERT's zero-shot (test_tasks.py)
    m = fine_tune(bert, "top-k", 1)  # builds; training needs the task's linear head
    with pytest.raises(PtuneError, match="task.head=linear"):
        m.trainable_tensors()


# -- fine-tune on a masked backbone (BERT) with the classification task's linear head -------------
# (the CLI end to end with task=sst2 is in test_classification.py)
def bert_fine_tune(bb, trainable, k=1):
    m = fine_tune(bb, trainable, k)
    m.attach_head(LinearHead(bb.dims.hidden, 2, dropout=0.0, seed=0))  # as ptune.build does for task.head=linear
    return m


def bert_batch(tok, side="right"):
    texts = ["a great film", "dull and far too long", "fine", "I loved every minute of it"]
    exs = [Example(tok(t).input_ids, [i % 2], "class") for i, t in enumerate(texts)]
    return exs, collate(exs, tok.pad_token_id, padding_side=side)


@pytest.mark.parametrize("trainable, k", [("all", 1), ("head", 1), ("top-k", 1)])
def test_masked_fine_tune_selects_the_encoder_tensors_and_the_task_head(trainable, k):
    bb = load("tiny-bert")
    m = bert_fine_tune(bb, trainable, k)
    model = bb.model
    layers = model.bert.encoder.layer
    tops = tuple(f"bert.encoder.layer.{i}." for i in range(len(layers) - k, len(layers)))
    expected = {"all": {n for n, _ in model.bert.named_parameters(prefix="bert")},  # not the unused MLM head
                "head": set(),
                "top-k": {n for n, _ in model.named_parameters() if n.startswith(tops)}}[trainable]
    trained = m.trainable_tensors()
    assert set(trained) == expected | {"head.weight", "head.bias"}
    body = {"all": sum(p.numel() for p in model.bert.parameters()), "head": 0,
            "top-k": sum(p.numel() for p in layers[-k:].parameters())}[trainable]
    assert sum(p.numel() for p in trained.values()) == body + bb.dims.hidden * 2 + 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_masked_fine_tune_adapter_holds_the_selection_and_the_head(tmp_path):
    from ptune.adapter import adapter_tensors

    bb = load("tiny-bert")
    m = bert_fine_tune(bb, "top-k", 1)
    with torch.no_grad():
        for p in m.trainable_tensors().values():
            p.add_(torch.randn_like(p) * 0.1)
    tensors = adapter_tensors(m)  # what ptune/train/job.py writes: the method's tensors and head.*
    assert set(tensors) == set(m.trainable_tensors()) == set(m.adapter_tensors())
    save_adapter(tmp_path, tensors, m.adapter_config())
    config, tensors = load_adapter(tmp_path)
    assert config["task_head"] and config["blocks"] == "bert.encoder.layer (2 blocks)"
    m3 = bert_fine_tune(load("tiny-bert"), "top-k", 1)
    m3.load_adapter_tensors(tensors)  # the method alone takes head.* too
    _, batch = bert_batch(bb.tokenizer)
    with torch.no_grad():
        a = class_logits(m, batch["input_ids"], batch["attention_mask"])
        assert torch.equal(a, class_logits(m3, batch["input_ids"], batch["attention_mask"]))


# -- the CLI end to end ------------------------------------------------------------------------------
def test_cli_fine_tune_t5_on_e2e_then_eval(in_tmp, data_dir):
    # TINY, with one evaluation (at the end) to keep the run short
    assert main(["train", "method=fine-tune", "model=tiny-t5", "task=e2e", *TINY, "trainer.eval_every=6"]) == 0
    [run] = sorted(p for p in (in_tmp / "outputs").glob("*/*") if p.is_dir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["model"] == "tiny-t5" and summary["method"] == "fine-tune"
    assert set(summary["eval"]) == {"bleu", "nist", "rouge_l", "cider"}
    n_params = sum(p.numel() for p in load("tiny-t5").model.parameters())
    assert summary["trainable_params"] == summary["total_params"] == n_params
    assert summary["final_train_loss"] < 11  # ln(vocab 49152) = 10.8 at init; 6 steps of full fine-tuning
    preds = [json.loads(line) for line in (run / "predictions/dev.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(isinstance(p["prediction"], str) for p in preds)
    assert main(["eval", f"run={run}"]) == 0
    assert json.loads((run / "eval_dev.json").read_text())["metrics"] == summary["eval"]

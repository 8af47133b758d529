"""Level 2 and 4: encoder-decoder backbones (tiny T5, tiny BART) with hard-prompt and fine-tune, the
seq2seq loss and generation path, E2E as seq2seq examples, and fine-tune on a masked backbone (BERT)."""

import copy
import json

import pytest
import torch

from conftest import TINY
from ptune.adapter import save_adapter, load_adapter
from ptune import methods, tasks
from ptune.cli import main
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.generate import encode_sources, generate_texts, special_wrap
from ptune.heads import LinearHead, class_logits, class_loss, seq2seq_forward, seq2seq_loss
from ptune.heads import loss as head_loss
from test_prefix import load

BACKBONES = ["tiny-t5", "tiny-bart"]
# The top decoder blocks and final decoder norm of each, written out by hand so that the generic
# search in fine_tune.find_blocks is checked against an independent answer. BART is post-LN: its
# decoder has no final norm (layernorm_embedding, registered after the layers, runs before them).
LAYOUT = {"tiny-t5": ("decoder.block", "decoder.final_layer_norm"), "tiny-bart": ("model.decoder.layers", None)}
GREEDY = dict(do_sample=False, num_beams=1, eos_token_id=None, forced_eos_token_id=None)


@pytest.fixture(scope="module", params=BACKBONES)
def backbone(request):
    return load(request.param)


def fine_tune(backbone, trainable="all", k=2):
    return methods.build("fine-tune", backbone, trainable=trainable, k=k)


def toy_examples(tok, sources=("name : Eagle | food : French", "name : Mill", "name : Punter | area : riverside"),
                 targets=("The Eagle serves French food.", "The Mill.", "Punter is by the river, near a bridge.")):
    src = encode_sources(tok, list(sources), 64, "seq2seq")
    return [Example(s, tok(t).input_ids + [tok.eos_token_id], "seq2seq") for s, t in zip(src, targets)]


def decoder_logits(method, batch):
    """(batch, tgt, vocab): the decoder's logits for the batch's labels, through ptune's seq2seq path."""
    dec = method.backbone.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return seq2seq_forward(method, batch["input_ids"], batch["attention_mask"], dec).logits


def sgd_steps(method, batch, steps, lr=1e-2, loss_fn=seq2seq_loss):
    opt = torch.optim.AdamW(method.trainable_tensors().values(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, n = loss_fn(method, **batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    return losses


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
def expected_names(backbone, trainable, k) -> set[str]:
    model = backbone.model
    first = {id(p): n for n, p in model.named_parameters()}
    head = {first[id(p)] for p in model.get_output_embeddings().parameters()}
    if trainable == "all":
        return set(first.values())
    if trainable == "head":
        return head
    blocks_path, norm_path = LAYOUT[backbone.name]
    n = len(model.get_submodule(blocks_path))
    tops = tuple(f"{blocks_path}.{i}." for i in range(n - k, n)) + ((norm_path + ".",) if norm_path else ())
    return {name for name in first.values() if name.startswith(tops)} | head


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


# about 11.0 -> 10.6 (head) and -> 7.4 (top-1) nats in 4 steps on tiny-t5; BART moves more
@pytest.mark.parametrize("trainable, k, fall", [("head", 2, 0.3), ("top-k", 1, 2.0)])
def test_training_changes_only_the_selected_tensors_and_loss_falls(trainable, k, fall):
    for name in BACKBONES:
        bb = load(name)
        m = fine_tune(bb, trainable, k)
        before = {n: t.clone() for n, t in bb.model.state_dict().items()}
        losses = sgd_steps(m, collate(toy_examples(bb.tokenizer), bb.tokenizer.pad_token_id), 4)
        assert losses[-1] < losses[0] - fall, (name, losses)
        selected = {id(p) for p in m.trainable_tensors().values()}
        for n, p in bb.model.named_parameters(remove_duplicate=False):
            assert torch.equal(p, before[n]) != (id(p) in selected), f"{name} {n}"
            assert p.grad is None or id(p) in selected
        for n, b in bb.model.named_buffers():
            assert torch.equal(b, before[n]), n


@pytest.mark.parametrize("name", BACKBONES)
def test_full_fine_tuning_loss_falls(name):
    bb = load(name)
    losses = sgd_steps(fine_tune(bb, "all"), collate(toy_examples(bb.tokenizer), bb.tokenizer.pad_token_id), 4)
    assert losses[-1] < losses[0] - 2.5, losses  # about 11.0 -> 6.6 (T5), 10.9 -> 8.0 (BART)


@pytest.mark.parametrize("trainable, k", [("all", 2), ("top-k", 1)])
def test_adapter_roundtrip_gives_identical_logits(trainable, k, tmp_path):
    for name in BACKBONES:
        bb = load(name)
        m = fine_tune(bb, trainable, k)
        with torch.no_grad():
            for p in m.trainable_tensors().values():
                p.add_(torch.randn_like(p) * 0.1)
        save_adapter(tmp_path / name, m.adapter_tensors(), m.adapter_config())
        config, tensors = load_adapter(tmp_path / name)
        assert (config["trainable"], config["k"], config["tied_head"]) == (trainable, k, True)
        fresh = load(name)
        batch = collate(toy_examples(bb.tokenizer), bb.tokenizer.pad_token_id)
        with torch.no_grad():
            untouched = decoder_logits(fine_tune(fresh, trainable, k), batch)
            m2 = fine_tune(fresh, trainable, k)
            m2.load_adapter_tensors(tensors)
            a, b = decoder_logits(m, batch), decoder_logits(m2, batch)
        model = fresh.model
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
        assert model.get_encoder().embed_tokens.weight is model.get_input_embeddings().weight
        assert not torch.equal(a, untouched)
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["hard-prompt", "fine-tune"])
def test_padding_does_not_change_logits(backbone, method):
    """Sources and targets of three lengths: each row alone == inside a left- or right-padded batch
    (BART's absolute encoder positions included: real tokens are moved first)."""
    m = methods.build(method, backbone)
    exs = toy_examples(backbone.tokenizer)
    pad = backbone.tokenizer.pad_token_id
    with torch.no_grad():
        for side in ("left", "right"):
            batch = collate(exs, pad, padding_side=side)
            full = decoder_logits(m, batch)
            for i, e in enumerate(exs):
                ref = decoder_logits(m, collate([e], pad))[0]
                torch.testing.assert_close(full[i, : len(e.labels)], ref, atol=1e-5, rtol=1e-5)


# -- generation -------------------------------------------------------------------------------------
def step_by_step(method, example, n):
    """Greedy decoding by hand: n argmax steps of the decoder, from the model's start token."""
    model = method.backbone.model
    src = torch.tensor([example.input_ids])
    dec = torch.tensor([[model.config.decoder_start_token_id]])
    for _ in range(n):
        with torch.no_grad():
            nxt = seq2seq_forward(method, src, torch.ones_like(src), dec).logits[0, -1].argmax()
        dec = torch.cat([dec, nxt.view(1, 1)], 1)
    return dec[0, 1:].tolist()


@pytest.mark.parametrize("method", ["hard-prompt", "fine-tune"])
def test_greedy_and_beam_generate_new_tokens_only(backbone, method):
    m = methods.build(method, backbone)
    tok = backbone.tokenizer
    exs = toy_examples(tok)
    kw = dict(max_new_tokens=5, pad_token_id=tok.pad_token_id)
    expected = [step_by_step(m, e, 5) for e in exs]
    for side in ("left", "right"):  # generate_texts right-pads; the contract allows left padding too
        batch = collate(exs, tok.pad_token_id, padding_side=side)
        greedy = m.generate(batch["input_ids"], batch["attention_mask"], **kw, **GREEDY)
        assert greedy.tolist() == expected  # (3, 5): new tokens only, no decoder start token
    beams = m.generate(batch["input_ids"], batch["attention_mask"], **kw, **{**GREEDY, "num_beams": 3})
    assert beams.shape == (3, 5)

    def score(new, i):  # log-probability of the new tokens given the source
        labels = new.view(1, -1)
        single = {"input_ids": batch["input_ids"][i:i + 1], "attention_mask": batch["attention_mask"][i:i + 1],
                  "labels": labels}
        with torch.no_grad():
            return -seq2seq_loss(m, **single)[0].item()

    for i in range(3):
        assert score(beams[i], i) >= score(greedy[i], i) - 1e-4


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
    m.attach_head(LinearHead(bb.dims.hidden, 2, dropout=0.0, seed=0))  # as train.build does for task.head=linear
    return m


def bert_batch(tok, side="right"):
    texts = ["a great film", "dull and far too long", "fine", "I loved every minute of it"]
    exs = [Example(tok(t).input_ids, [i % 2], "class") for i, t in enumerate(texts)]
    return exs, collate(exs, tok.pad_token_id, padding_side=side)


@pytest.mark.parametrize("trainable, k", [("all", 1), ("head", 1), ("top-k", 1)])
def test_masked_fine_tune_trains_the_encoder_selection_and_the_task_head(trainable, k):
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
    before = {n: t.clone() for n, t in model.state_dict().items()}
    head_before = {n: t.clone() for n, t in m.head.state_dict().items()}
    _, batch = bert_batch(bb.tokenizer)
    # The encoder's layers memorize the four examples (about 0.69 -> 0.01 nats). A random tiny BERT's
    # [CLS] states differ by ~1% of their norm, so the head alone barely moves the loss: its case
    # checks only what changes (test_classification trains a linear probe on tiny-llama).
    losses = sgd_steps(m, batch, 12 if trainable != "head" else 2, lr=3e-3, loss_fn=class_loss)
    assert trainable == "head" or losses[-1] < losses[0] - 0.5
    selected = {id(p) for p in trained.values()}
    for n, p in model.named_parameters(remove_duplicate=False):  # aliases too (the MLM decoder's tied weight)
        assert torch.equal(p, before[n]) != (id(p) in selected), n
        assert p.grad is None or id(p) in selected
    assert all(not torch.equal(t, head_before[n]) for n, t in m.head.state_dict().items())


def test_masked_fine_tune_roundtrip_and_padding(tmp_path):
    from ptune.adapter import adapter_tensors, load_adapter_tensors

    bb = load("tiny-bert")
    m = bert_fine_tune(bb, "top-k", 1)
    with torch.no_grad():
        for p in m.trainable_tensors().values():
            p.add_(torch.randn_like(p) * 0.1)
    tensors = adapter_tensors(m)  # what train.py writes: the method's tensors and head.*
    assert set(tensors) == set(m.trainable_tensors()) == set(m.adapter_tensors())
    save_adapter(tmp_path, tensors, m.adapter_config())
    config, tensors = load_adapter(tmp_path)
    assert config["task_head"] and config["blocks"] == "bert.encoder.layer (2 blocks)"
    m2 = bert_fine_tune(load("tiny-bert"), "top-k", 1)
    load_adapter_tensors(m2, tensors)  # train.py's path: head.* split off, the rest to the method
    m3 = bert_fine_tune(load("tiny-bert"), "top-k", 1)
    m3.load_adapter_tensors(tensors)  # the method alone takes head.* too
    exs, batch = bert_batch(bb.tokenizer)
    with torch.no_grad():
        a = class_logits(m, batch["input_ids"], batch["attention_mask"])
        assert torch.equal(a, class_logits(m2, batch["input_ids"], batch["attention_mask"]))
        assert torch.equal(a, class_logits(m3, batch["input_ids"], batch["attention_mask"]))
        for side in ("left", "right"):  # positions come from the mask: left pads move nothing
            _, padded = bert_batch(bb.tokenizer, side)
            full = class_logits(m, padded["input_ids"], padded["attention_mask"])
            for i, e in enumerate(exs):
                alone = collate([e], bb.tokenizer.pad_token_id)
                torch.testing.assert_close(full[i], class_logits(m, alone["input_ids"], alone["attention_mask"])[0],
                                           atol=1e-5, rtol=1e-5)


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

"""The verbalizer head (ptune/heads/verbalizer.py): label words scored by all their pieces on every backbone
kind (checked by hand against the plain model), and methods x heads composing on tiny models."""

import pytest
import torch
import torch.nn.functional as F

from ptune.cli import compose
from ptune.data import collate
from ptune.heads import loss as head_loss
from ptune.build import build
from ptune.heads.verbalizer import VerbalizerHead

ROWS = [{"sentence": "a gorgeous , witty , seductive movie .", "label": 1}, {"sentence": "dull", "label": 0}]


def setup(*overrides):
    return build(compose(["task=sst2", "task.head=verbalizer", "task.max_train_samples=8", *overrides]))


def pieces(tok, word):
    return tuple(tok(" " + word, add_special_tokens=False).input_ids)


@torch.no_grad()
def by_hand(backbone, task, row, word) -> float:
    """log P(word | row) from full forwards of the plain model, piece by piece (teacher-forced)."""
    model, tok, kind = backbone.model, backbone.tokenizer, backbone.kind
    enc = task.template.encode(tok, row, task.max_len, mask_id=task._mask_id)
    ids, pos, w = enc.ids, enc.mask_pos, pieces(tok, word)
    total = 0.0
    for j in range(len(w)):
        if kind == "causal":
            x = torch.tensor([ids[:pos] + list(w[:j])])
            logits = model(input_ids=x).logits[0, -1]
        elif kind == "masked":
            x = torch.tensor([ids[:pos] + list(w[:j]) + [tok.mask_token_id] * (len(w) - j) + ids[pos + 1:]])
            logits = model(input_ids=x).logits[0, pos + j]
        else:  # seq2seq: the tiny models' tokenizer has no mask token, so the slot is left out
            x = torch.tensor([ids[:pos] + ids[pos + 1:]])
            dec = torch.tensor([[model.config.decoder_start_token_id, *w[:j]]])
            logits = model(input_ids=x, decoder_input_ids=dec).logits[0, -1]
        total += F.log_softmax(logits.float(), -1)[w[j]].item()
    return total


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert", "tiny-t5"])
def test_multi_token_words_are_scored_by_all_their_pieces(model):
    backbone, method, task = setup(f"model={model}", "method=hard-prompt")
    tok = backbone.tokenizer
    words = [["terrible"], ["great", "zyxqwv"]]  # class 1: a common word and a made-up one of several pieces
    assert len(pieces(tok, "zyxqwv")) >= 3
    method.head = VerbalizerHead(backbone, [[pieces(tok, w) for w in ws] for ws in words], list(task.labels))
    batch = collate(task.examples(tok, ROWS), tok.pad_token_id)  # two lengths: one row padded
    with torch.no_grad():
        scores = method.head.scores(method, batch)  # (2, 2)
    for r, row in enumerate(ROWS):
        neg = by_hand(backbone, task, row, "terrible")
        pos = torch.logsumexp(torch.tensor([by_hand(backbone, task, row, "great"),
                                            by_hand(backbone, task, row, "zyxqwv")]), 0).item()
        assert scores[r].tolist() == pytest.approx([neg, pos], abs=1e-4)
    # the test can fail: scoring the made-up word by its first piece only gives another class score
    w = pieces(tok, "zyxqwv")
    method.head = VerbalizerHead(backbone, [[pieces(tok, "terrible")], [pieces(tok, "great"), w[:1]]], list(task.labels))
    with torch.no_grad():
        truncated = method.head.scores(method, batch)
    assert abs(truncated[0, 1].item() - scores[0, 1].item()) > 1e-3


@pytest.mark.parametrize("name, overrides, expect", [
    ("PET: fine-tune + verbalizer (BERT, MLM head trains)", ["model=tiny-bert", "method=fine-tune",
                                                             "trainer.lr=1e-3"], "cls.predictions.transform"),
    ("Lester: prompt + verbalizer (causal)", ["model=tiny-llama", "method=prompt", "method.num_virtual_tokens=3"], "prompt"),
    ("Lester: prompt + verbalizer (T5 decoder)", ["model=tiny-t5", "method=prompt", "method.num_virtual_tokens=3"], "prompt"),
    ("p-tuning + {soft} template (BERT)", ["model=tiny-bert", "method=p-tuning", "method.num_virtual_tokens=4",
                                           "task.template='{soft:2} {sentence} {soft:2} It was {mask} .'"], "embedding"),
    ("p-tuning + {soft} template (causal)", ["model=tiny-gpt2", "method=p-tuning", "method.num_virtual_tokens=4",
                                             "task.template='{soft:2} {sentence} {soft:2} It was {mask}'"], "embedding"),
    ("prefix + verbalizer (BART)", ["model=tiny-bart", "method=prefix", "method.num_virtual_tokens=3"], "prefixes"),
])
def test_methods_compose_with_the_verbalizer_and_learn(data_dir, name, overrides, expect):
    backbone, method, task = setup(*overrides)
    tok = backbone.tokenizer
    trained = method.trainable_tensors()
    assert any(expect in k for k in trained), sorted(trained)[:5]
    examples = task.train_examples(tok, backbone.kind)
    batch = collate(examples, tok.pad_token_id)
    if "{soft" in " ".join(overrides):
        assert task.keep_soft and batch["soft_mask"].sum(-1).tolist() == [4] * len(examples)
    else:
        assert "soft_mask" not in batch
    opt = torch.optim.AdamW(trained.values(), lr=1e-3 if "trainer.lr=1e-3" in overrides else 1e-2)
    backbone.model.eval()  # no dropout: the loss must fall step by step on these 8 sentences
    losses = []
    for _ in range(6):
        loss, n = head_loss(method, batch)
        (loss / n).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    assert losses[-1] < losses[0], losses
    if "{soft" in " ".join(overrides):
        assert method.n_prepended == 0  # the prompts went to the template's slots, none prepended


def test_hard_prompt_with_a_verbalizer_is_zero_shot_on_bert(data_dir):
    backbone, method, task = setup("model=tiny-bert", "method=hard-prompt", "task.max_eval_samples=8")
    assert method.trainable_tensors() == {}
    scores, records = task.evaluate(method, "dev", 4)
    assert set(scores) == {"accuracy"} and len(records) == 8 and "[MASK]" in records[0]["text"]


@pytest.mark.parametrize("overrides", [
    ["model=tiny-bert", "method=prompt", "method.num_virtual_tokens=3"],  # prompts before [CLS]
    ["model=tiny-bert", "method=p-tuning-v2", "method.num_virtual_tokens=3"],
    ["model=tiny-llama", "method=p-tuning", "method.num_virtual_tokens=2",
     "task.template='{soft} {sentence} {soft} It was {mask}'"],
    ["model=tiny-t5", "method=prompt", "method.num_virtual_tokens=3"],
    ["model=tiny-bart", "method=prefix", "method.num_virtual_tokens=3"],
])
def test_scores_of_a_row_do_not_depend_on_its_batch(overrides):
    backbone, method, task = setup(*overrides)
    with torch.no_grad():
        for p in method.parameters():  # away from the init, so that every prompt position matters
            p.add_(torch.randn_like(p) * 0.1)
    tok = backbone.tokenizer
    rows = [*ROWS, {"sentence": "an utterly forgettable , overlong and joyless film", "label": 0}]
    examples = task.examples(tok, rows)
    with torch.no_grad():
        together = method.head.scores(method, collate(examples, tok.pad_token_id))  # (3, 2), two rows padded
        for i, e in enumerate(examples):
            alone = method.head.scores(method, collate([e], tok.pad_token_id))[0]
            torch.testing.assert_close(together[i], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])  # the rows differ: the comparison means something


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert", "tiny-t5"])
def test_lama_scores_the_whole_vocabulary_at_the_mask(data_dir, model):
    """VocabHead (task=lama): log-probs over every token at the mask, as the plain model gives them."""
    backbone, method, task = build(compose(["task=lama", "task.relations=[P19]", f"model={model}", "method=hard-prompt"]))
    tok, lm = backbone.tokenizer, backbone.model
    row = {"sub": "Dante", "obj": "Florence", "relation": "P19", "template": "[X] was born in [Y] ."}
    [example] = task._examples(tok, [row], [0])
    with torch.no_grad():
        scores = method.head.scores(method, collate([example], tok.pad_token_id))[0]  # (vocab,)
        ids, pos = example.input_ids, example.mask_pos
        if backbone.kind == "causal":
            logits = lm(input_ids=torch.tensor([ids[:pos]])).logits[0, -1]
        elif backbone.kind == "masked":
            assert ids[pos] == tok.mask_token_id
            logits = lm(input_ids=torch.tensor([ids])).logits[0, pos]
        else:
            logits = lm(input_ids=torch.tensor([ids[:pos] + ids[pos + 1:]]),
                        decoder_input_ids=torch.tensor([[lm.config.decoder_start_token_id]])).logits[0, 0]
    assert scores.shape == logits.shape == (lm.config.vocab_size,)  # the whole vocabulary competes
    torch.testing.assert_close(scores, F.log_softmax(logits.float(), -1), atol=1e-4, rtol=1e-4)


def test_seq2seq_reads_a_sentinel_at_the_mask_and_before_the_word():
    """T5's span-corruption format: encoder "x It was <extra_id_0> .", decoder "<extra_id_0> word".
    (The tiny models' tokenizer has no sentinel: one id stands in for it here.)"""
    backbone, method, task = setup("model=tiny-t5", "method=hard-prompt")
    model, tok = backbone.model, backbone.tokenizer
    assert method.head.enc_slot == [] and method.head.dec_prefix == [model.config.decoder_start_token_id]
    sentinel = 1234
    method.head.enc_slot, method.head.dec_prefix = [sentinel], [model.config.decoder_start_token_id, sentinel]
    batch = collate(task.examples(tok, ROWS[:1]), tok.pad_token_id)
    with torch.no_grad():
        scores = method.head.scores(method, batch)[0]
        enc = task.template.encode(tok, ROWS[0], task.max_len, mask_id=task._mask_id)
        x = torch.tensor([enc.ids[:enc.mask_pos] + [sentinel] + enc.ids[enc.mask_pos + 1:]])
        expected = []
        for word in ("terrible", "great"):
            w = pieces(tok, word)
            dec = torch.tensor([[model.config.decoder_start_token_id, sentinel, *w[:-1]]])
            logp = F.log_softmax(model(input_ids=x, decoder_input_ids=dec).logits[0].float(), -1)
            expected.append(sum(logp[1 + j, w[j]].item() for j in range(len(w))))
    assert scores.tolist() == pytest.approx(expected, abs=1e-4)

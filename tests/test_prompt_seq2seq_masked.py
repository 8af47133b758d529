"""Level 2: prompt tuning on tiny encoder-decoder (T5, BART) and masked (BERT) backbones: counts,
why BART is padding invariant, PEFT's prompt tuning, and the paper's class-label initialisation
(tests/test_prompt.py covers decoder-only backbones). What every method proves on every backbone
(frozen weights, a falling loss, the adapter round trip, padding, greedy and beam): test_contract.py."""

import pytest
import torch

from conftest import load
from ptune import methods
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.methods.base import real_tokens_first
from ptune.methods.prompt import common_token_ids

BACKBONES = ["tiny-t5", "tiny-bart", "tiny-bert"]
PAIRS = [("name : Eagle | food : French", " The Eagle serves French food."), ("name : Mill", " The Mill.")]
# BERT: a cloze per row; the word at [MASK] is the target (a verbalizer-style task for the MLM head)
CLOZES = [("a great , moving film . it was [MASK] .", "good"), ("dull . it was [MASK] .", "bad")]


def prompt(backbone, p=5, **kw):
    torch.manual_seed(0)
    return methods.build("prompt", backbone, num_virtual_tokens=p, **kw)


def examples(backbone):
    """Two rows of different lengths: seq2seq (source -> target + eos) or BERT clozes (class layout)."""
    tok = backbone.tokenizer
    if backbone.kind == "seq2seq":
        return [Example(tok(s).input_ids, tok(t).input_ids + [tok.eos_token_id], "seq2seq") for s, t in PAIRS]
    return [Example(tok(s).input_ids, tok(w, add_special_tokens=False).input_ids, "class") for s, w in CLOZES]


def batch_of(backbone, exs, side="right"):
    return collate(exs, backbone.tokenizer.pad_token_id, padding_side=side)


def logits(m, input_ids, attention_mask, decoder_input_ids=None):
    """seq2seq: decoder logits (batch, tgt, vocab); masked: MLM logits of the real positions (batch, seq, vocab)."""
    if m.dims.is_encoder_decoder:
        return m.backbone.model(**m.model_inputs(input_ids, attention_mask), decoder_input_ids=decoder_input_ids).logits
    return m.backbone.model(**m.model_inputs(input_ids, attention_mask)).logits[:, m.n_prepended:]


def decoder_inputs(m, batch):
    return m.backbone.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])


def test_parameter_counts(backbone):
    m = prompt(backbone, p=7)
    H = backbone.dims.hidden
    assert sum(t.numel() for t in m.trainable_tensors().values()) == 7 * H  # p * hidden, encoder side only
    assert {k: tuple(v.shape) for k, v in m.adapter_tensors().items()} == {"prompt": (7, H)}
    assert m.n_prepended == 7


def test_real_tokens_first_is_why_bart_is_padding_invariant():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    ids = torch.tensor([[9, 9, 1, 2, 3], [1, 2, 3, 4, 5], [7, 8, 9, 9, 9]])
    m2, ids2 = real_tokens_first(mask, ids)
    assert m2.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert ids2.tolist() == [[1, 2, 3, 9, 9], [1, 2, 3, 4, 5], [7, 8, 9, 9, 9]]
    # BartEncoder numbers positions 0..seq-1 whatever the mask (it takes no position_ids), so without
    # the reordering a left-padded row's encoder states move with its padding:
    bart = load("tiny-bart").model.get_encoder()
    left, alone = torch.tensor([[2, 2, 11, 12, 13]]), torch.tensor([[11, 12, 13]])
    with torch.no_grad():
        shifted = bart(input_ids=left, attention_mask=torch.tensor([[0, 0, 1, 1, 1]])).last_hidden_state[0, 2:]
        ref = bart(input_ids=alone).last_hidden_state[0]
    assert (shifted - ref).abs().max() > 1e-3


GEN = dict(do_sample=False, eos_token_id=None, forced_eos_token_id=None)  # BART forces EOS last by default


def test_masked_models_do_not_generate():
    m = prompt(load("tiny-bert"))
    ids = torch.tensor([[101, 2171, 102]])
    with pytest.raises(PtuneError, match="does not generate"):
        m.generate(ids, torch.ones_like(ids), max_new_tokens=2)


@pytest.mark.parametrize("name", BACKBONES)
def test_matches_peft_prompt_tuning(name):
    """PEFT's PromptTuning given the same tensor gives the same logits (and greedy tokens for enc-dec).

    seq2seq: PEFT's default num_transformer_submodules=2 allocates 2p rows and feeds the encoder
    only the first p: our prompt goes there, the other p rows are never read (filled with noise
    here to show it). BERT: PEFT's FEATURE_EXTRACTION wrapper, which prepends as we do."""
    peft = pytest.importorskip("peft")
    bb = load(name)
    m = prompt(bb, p=4, init="random")
    seq2seq = bb.kind == "seq2seq"
    config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM" if seq2seq else "FEATURE_EXTRACTION", num_virtual_tokens=4)
    pm = peft.get_peft_model(load(name).model, config)
    table = pm.prompt_encoder["default"].embedding.weight
    assert table.shape == ((8 if seq2seq else 4), bb.dims.hidden)
    with torch.no_grad():
        table.normal_()
        table[:4] = m.adapter_tensors()["prompt"]
    batch = batch_of(bb, examples(bb)[:1])  # unpadded: PEFT shifts a left-padded row's positions
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        if seq2seq:
            dec = decoder_inputs(m, batch)
            ours = logits(m, ids, mask, dec)
            theirs = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        else:
            ours = logits(m, ids, mask)
            theirs = pm(input_ids=ids, attention_mask=mask).logits[:, 4:]  # PEFT's output includes the virtual positions
    assert ours.shape == theirs.shape and (ours - theirs).abs().max().item() <= 1e-5
    if seq2seq:
        kw = dict(max_new_tokens=5, pad_token_id=bb.tokenizer.pad_token_id, **GEN)
        assert torch.equal(m.generate(ids, mask, **kw), pm.generate(input_ids=ids, attention_mask=mask, **kw)[:, 1:])


# -- class-label initialisation (paper §3.2) ---------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-t5", "tiny-bert"])  # byte-level BPE and WordPiece vocabularies
def test_labels_init_embeds_each_class_label_then_samples_vocab(name):
    bb = load(name)
    tok, table = bb.tokenizer, bb.model.get_input_embeddings()
    words = ["negative", "positive", ["so-so", "meh"]]  # the last class has two label words
    m = prompt(bb, p=6, init="labels", label_words=words)
    got = m.prompt.detach()
    for i, w in enumerate(words):
        ids = [t for x in ([w] if isinstance(w, str) else w) for t in tok(x, add_special_tokens=False).input_ids]
        assert i < 2 or len(ids) > 1  # two words: several tokens to average
        assert torch.equal(got[i], table.weight[ids].mean(0))  # row i: the mean of class i's token embeddings
    pool = common_token_ids(tok, len(tok))
    torch.manual_seed(0)
    rest = table.weight[pool[torch.randperm(len(pool))[:6]]]  # the same draw as init=vocab, rows 3.. kept
    assert torch.equal(got[3:], rest[3:])
    assert torch.equal(got[3:], prompt(bb, p=6, init="vocab").prompt.detach()[3:])
    # more classes than prompt rows: the first p labels are used
    two = prompt(bb, p=2, init="labels", label_words=words).prompt.detach()
    assert torch.equal(two, got[:2])


@pytest.mark.parametrize("words", [None, []])
def test_labels_init_without_label_words_fails_clearly(words):
    with pytest.raises(PtuneError, match="method.init=labels needs the label words of a classification task"):
        prompt(load("tiny-t5"), init="labels", label_words=words)


def test_labels_init_through_build(data_dir):
    """ptune.build hands the task's label words to the method; a generation task has none."""
    from ptune.cli import compose
    from ptune.build import build

    _, m, task = build(compose(["model=tiny-bert", "task=sst2", "method=prompt", "method.init=labels",
                                "method.num_virtual_tokens=3"]))
    table = m.backbone.model.get_input_embeddings().weight
    for i, word in enumerate(task.label_words()):
        ids = m.backbone.tokenizer(word, add_special_tokens=False).input_ids
        assert torch.equal(m.prompt.detach()[i], table[ids].mean(0))
    with pytest.raises(PtuneError, match="this task has none"):
        build(compose(["model=tiny-t5", "task=e2e", "method=prompt", "method.init=labels"]))


def test_vocab_pool_skips_berts_unused_slots():
    tok = load("tiny-bert").tokenizer
    pool = common_token_ids(tok, len(tok))
    names = tok.convert_ids_to_tokens(pool.tolist())
    assert len(pool) == 5000 and not any(n.startswith("[unused") for n in names)
    assert names[0] == "!" and "the" in names and tok.mask_token_id not in pool.tolist()

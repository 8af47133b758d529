"""Level 2: prompt tuning on tiny encoder-decoder (T5, BART) and masked (BERT) backbones, and the
paper's class-label initialisation (tests/test_prompt.py covers decoder-only backbones)."""

import pytest
import torch
import torch.nn.functional as F

from ptune.adapter import save_adapter, load_adapter
from ptune import heads, methods
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.methods.base import real_tokens_first
from ptune.methods.prompt import common_token_ids
from test_prefix import load  # the tiny backbones, built from conf/model/tiny-*.yaml
from test_prompt import best_of_two_step_beam

SEQ2SEQ = ["tiny-t5", "tiny-bart"]
ALL = SEQ2SEQ + ["tiny-bert"]
PAIRS = [("name : Eagle | food : French", " The Eagle serves French food."), ("name : Mill", " The Mill.")]
# BERT: a cloze per row; the word at [MASK] is the target (a verbalizer-style task for the MLM head)
CLOZES = [("a great , moving film . it was [MASK] .", "good"), ("dull . it was [MASK] .", "bad")]


@pytest.fixture(scope="module", params=ALL)
def backbone(request):
    return load(request.param)


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


def cloze_loss(m, batch):
    """BERT: summed cross-entropy of the target word at each row's [MASK] (MLM head), and the count."""
    at_mask = batch["input_ids"] == m.backbone.tokenizer.mask_token_id  # (batch, seq), one per row
    out = logits(m, batch["input_ids"], batch["attention_mask"])[at_mask]  # (batch, vocab)
    return F.cross_entropy(out, batch["labels"], reduction="sum"), len(out)


def task_loss(m, batch):
    return heads.loss(m, batch) if m.dims.is_encoder_decoder else cloze_loss(m, batch)


def sharpened(name):
    """A tiny backbone with its matrices redrawn ~ N(0, 0.3). BART and BERT initialise N(0, 0.02),
    which leaves their random logits flat: whatever the input, greedy repeats one token (a wrong
    decoding loop would pass unnoticed) and the loss has a floor 0.006 nats (BART) and 0.008
    (BERT) below its start, measured for prompts at lr 1e-2..3e-1. T5's own scaled init (0.125 and
    up) decodes varied tokens only at this scale too."""
    bb = load(name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bb.model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return bb


def test_parameter_counts(backbone):
    m = prompt(backbone, p=7)
    H = backbone.dims.hidden
    assert sum(t.numel() for t in m.trainable_tensors().values()) == 7 * H  # p * hidden, encoder side only
    assert {k: tuple(v.shape) for k, v in m.adapter_tensors().items()} == {"prompt": (7, H)}
    assert m.n_prepended == 7


@pytest.mark.parametrize("name", ALL)
def test_training_touches_only_the_prompt_and_loss_falls(name):
    backbone = load(name) if name == "tiny-t5" else sharpened(name)
    m = prompt(backbone)
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    batch = batch_of(backbone, examples(backbone))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-1)
    losses = []
    for _ in range(10):
        loss, n = task_loss(m, batch)
        (loss / n).backward()
        assert all(p.grad is None for p in backbone.model.parameters())
        assert m.prompt.grad is not None and m.prompt.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    # Measured drops after 10 steps: T5 1.15 (its own init), BART 2.3 and BERT 6.4 nats (sharpened;
    # 0.006 / 0.008 at their default init, see `sharpened`).
    assert losses[-1] < losses[0] - {"tiny-t5": 0.4, "tiny-bart": 0.75, "tiny-bert": 2.0}[name]
    for k, v in backbone.model.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen weight {k} changed"


def test_adapter_roundtrip_gives_identical_logits(backbone, tmp_path):
    m = prompt(backbone)
    with torch.no_grad():
        m.prompt.add_(torch.randn_like(m.prompt) * 0.1)
    save_adapter(tmp_path / "adapter", m.adapter_tensors(), m.adapter_config())
    m2 = prompt(load(backbone.name), init="random")  # a fresh backbone, other starting values, then the adapter
    _, tensors = load_adapter(tmp_path / "adapter")
    m2.load_adapter_tensors(tensors)
    assert not list(m2.trainable_tensors())
    batch = batch_of(backbone, examples(backbone))
    dec = decoder_inputs(m, batch) if m.dims.is_encoder_decoder else None
    with torch.no_grad():
        assert torch.equal(logits(m, batch["input_ids"], batch["attention_mask"], dec),
                           logits(m2, batch["input_ids"], batch["attention_mask"], dec))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_logits(backbone, side):
    m = prompt(backbone)
    exs = examples(backbone)
    batch = batch_of(backbone, exs, side)
    with torch.no_grad():
        if m.dims.is_encoder_decoder:  # the decoder's logits, fed the same targets
            full = logits(m, batch["input_ids"], batch["attention_mask"], decoder_inputs(m, batch))
            for i, e in enumerate(exs):
                alone = batch_of(backbone, [e])
                ref = logits(m, alone["input_ids"], alone["attention_mask"], decoder_inputs(m, alone))[0]
                torch.testing.assert_close(full[i, :len(e.labels)], ref, atol=1e-5, rtol=1e-5)
        else:  # every real position's MLM logits
            full = logits(m, batch["input_ids"], batch["attention_mask"])
            for i, e in enumerate(exs):
                alone = batch_of(backbone, [e])
                ref = logits(m, alone["input_ids"], alone["attention_mask"])[0]
                torch.testing.assert_close(full[i][batch["attention_mask"][i].bool()], ref, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_generate_matches_step_by_step_greedy(name):
    bb = sharpened(name)
    m = prompt(bb)
    tok = bb.tokenizer
    exs = examples(bb)
    batch = batch_of(bb, exs, "left")  # as ptune.generate pads
    new = m.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, num_beams=1,
                     pad_token_id=tok.pad_token_id, **GEN)
    assert new.shape == (2, 6)  # only the new tokens: the decoder start token is dropped
    for i, e in enumerate(exs):
        ids = torch.tensor([e.input_ids])
        dec = torch.tensor([[bb.model.config.decoder_start_token_id]])
        for _ in range(6):
            with torch.no_grad():
                nxt = logits(m, ids, torch.ones_like(ids), dec)[0, -1].argmax()
            dec = torch.cat([dec, nxt.view(1, 1)], 1)
        assert new[i].tolist() == dec[0, 1:].tolist()
    assert not torch.equal(new[0], new[1])  # the input steers the decoder (at the default init it does not)


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_beam_search(name):
    """Width-3 beam search over two steps returns the best path it can see (computed by hand);
    num_return_sequences gives the beams in order."""
    bb = sharpened(name)
    m = prompt(bb)
    batch = batch_of(bb, examples(bb), "left")
    kw = dict(max_new_tokens=2, num_beams=3, pad_token_id=bb.tokenizer.pad_token_id, **GEN)
    beams = m.generate(batch["input_ids"], batch["attention_mask"], **kw)
    two = m.generate(batch["input_ids"], batch["attention_mask"], num_return_sequences=2, **kw)
    assert beams.shape == (2, 2) and two.shape == (4, 2) and torch.equal(two[::2], beams)
    start = bb.model.config.decoder_start_token_id
    for i in range(2):
        def next_logprobs(prefix, i=i):
            dec = torch.tensor([[start, *prefix]])
            with torch.no_grad():
                return logits(m, batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1], dec)[0, -1].log_softmax(-1)
        assert beams[i].tolist() == best_of_two_step_beam(next_logprobs, 3)


def test_masked_models_do_not_generate():
    m = prompt(load("tiny-bert"))
    ids = torch.tensor([[101, 2171, 102]])
    with pytest.raises(PtuneError, match="does not generate"):
        m.generate(ids, torch.ones_like(ids), max_new_tokens=2)


@pytest.mark.parametrize("name", ALL)
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
    """train.build hands the task's label words to the method; a generation task has none."""
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

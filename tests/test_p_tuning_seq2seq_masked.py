"""Level 2: P-tuning on tiny encoder-decoder (T5, BART) and masked (BERT) backbones, with the prompt
vectors prepended and at soft positions of the (encoder) input (tests/test_p_tuning.py covers
decoder-only backbones)."""

import pytest
import torch
import torch.nn.functional as F

from ptune.adapter import save_adapter, load_adapter
from ptune import methods
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.methods.p_tuning import insert_soft
from test_p_tuning import encoder_count
from test_prompt_seq2seq_masked import ALL, GEN, SEQ2SEQ, best_of_two_step_beam, decoder_inputs, load, sharpened

P = 5
# Segments around which P soft positions go: (segments, soft positions per gap) and the target.
# seq2seq rows are encoder sources; BERT rows are clozes whose [MASK] word is the target.
SEQ2SEQ_ROWS = [(["name : Eagle", " | food : French"], [2, 1, 2], " The Eagle serves French food."),
                (["name : Mill"], [1, 4], " The Mill.")]
BERT_ROWS = [(["a great , moving film .", "it was [MASK] ."], [2, 2, 1], "good"), (["dull .", "it was [MASK] ."], [1, 3, 1], "bad")]


@pytest.fixture(scope="module", params=ALL)
def backbone(request):
    return load(request.param)


def ptuning(backbone, p=P, **kw):
    torch.manual_seed(0)
    return methods.build("p-tuning", backbone, num_virtual_tokens=p, **kw)


def rows(backbone, placement):
    """[(input_ids, soft flags, Example)]: soft positions per the table above, or none (prepended)."""
    tok = backbone.tokenizer
    seq2seq = backbone.kind == "seq2seq"
    out = []
    for segments, gaps, target in (SEQ2SEQ_ROWS if seq2seq else BERT_ROWS):
        seg_ids = [tok(s, add_special_tokens=False).input_ids for s in segments]
        if not seq2seq:  # [CLS] ... [SEP] around the cloze, never soft
            seg_ids[0], seg_ids[-1] = [tok.cls_token_id] + seg_ids[0], seg_ids[-1] + [tok.sep_token_id]
        if placement == "prepended":
            gaps = [0] * len(gaps)
        ids, soft = insert_soft(seg_ids, gaps)
        labels = tok(target).input_ids + [tok.eos_token_id] if seq2seq else tok(target, add_special_tokens=False).input_ids
        out.append((ids, soft, Example(ids, labels, "seq2seq" if seq2seq else "class")))
    return out


def batch_of(backbone, rs, side="right"):
    """input_ids, attention_mask, labels as ptune.data.collate pads them, and the soft mask alike."""
    batch = collate([e for _, _, e in rs], backbone.tokenizer.pad_token_id, side)
    flags = [Example([int(s) for s in soft], e.labels, e.layout) for _, soft, e in rs]
    batch["soft_mask"] = collate(flags, 0, side)["input_ids"].bool()
    return batch


def logits(m, batch, decoder_input_ids=None):
    """seq2seq: decoder logits (batch, tgt, vocab); masked: MLM logits of the input's positions."""
    inputs = m.model_inputs(batch["input_ids"], batch["attention_mask"], batch["soft_mask"])
    if m.dims.is_encoder_decoder:
        return m.backbone.model(**inputs, decoder_input_ids=decoder_input_ids).logits
    return m.backbone.model(**inputs).logits[:, m.n_prepended:]


def loss(m, batch):
    """Mean cross-entropy: the decoder's targets (seq2seq) or the word at [MASK] (BERT)."""
    if m.dims.is_encoder_decoder:
        keep = batch["labels"] != -100
        return F.cross_entropy(logits(m, batch, decoder_inputs(m, batch))[keep], batch["labels"][keep])
    at_mask = batch["input_ids"] == m.backbone.tokenizer.mask_token_id
    return F.cross_entropy(logits(m, batch)[at_mask], batch["labels"])


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_parameter_counts(backbone, encoder):
    H = backbone.dims.hidden
    m = ptuning(backbone, p=7, encoder=encoder)
    assert sum(t.numel() for t in m.trainable_tensors().values()) == 7 * H + encoder_count(encoder, H, H)
    assert {k: tuple(v.shape) for k, v in m.adapter_tensors().items()} == {"prompt": (7, H)}  # stored: p x hidden


@pytest.mark.parametrize("name, placement", [("tiny-t5", "prepended"), ("tiny-bart", "prepended"), ("tiny-bert", "soft")])
def test_training_touches_only_the_encoder_and_loss_falls(name, placement):
    """Prepended for the encoder-decoders; BERT as in the paper's LAMA runs, soft positions around [MASK]."""
    backbone = load(name) if name == "tiny-t5" else sharpened(name)  # BART/BERT: flat logits otherwise
    m = ptuning(backbone)
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    batch = batch_of(backbone, rows(backbone, placement))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        value = loss(m, batch)
        assert m.n_prepended == (P if placement == "prepended" else 0)
        value.backward()
        assert all(p.grad is None for p in backbone.model.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_tensors().values())
        opt.step()
        opt.zero_grad()
        losses.append(value.item())
    # Measured drops after 10 steps: T5 1.2, BART 0.91, BERT 4.5 nats (the other placement: 1.2, 0.97, 6.6).
    assert losses[-1] < losses[0] - {"tiny-t5": 0.4, "tiny-bart": 0.3, "tiny-bert": 1.5}[name]
    for k, v in backbone.model.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen weight {k} changed"


def test_adapter_roundtrip_gives_identical_logits(backbone, tmp_path):
    m = ptuning(backbone)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_adapter(tmp_path / "adapter", m.adapter_tensors(), m.adapter_config())
    m2 = ptuning(load(backbone.name))
    _, tensors = load_adapter(tmp_path / "adapter")
    m2.load_adapter_tensors(tensors)
    assert not list(m2.trainable_tensors()) and not hasattr(m2, "lstm_head")
    with torch.no_grad():
        for placement in ("prepended", "soft"):
            batch = batch_of(backbone, rows(backbone, placement))
            dec = decoder_inputs(m, batch) if m.dims.is_encoder_decoder else None
            assert torch.equal(logits(m, batch, dec), logits(m2, batch, dec))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("placement", ["prepended", "soft"])
def test_padding_does_not_change_logits(backbone, side, placement):
    m = ptuning(backbone)
    rs = rows(backbone, placement)
    batch = batch_of(backbone, rs, side)
    with torch.no_grad():
        if m.dims.is_encoder_decoder:
            full = logits(m, batch, decoder_inputs(m, batch))
            for i, r in enumerate(rs):
                alone = batch_of(backbone, [r])
                ref = logits(m, alone, decoder_inputs(m, alone))[0]
                torch.testing.assert_close(full[i, :len(r[2].labels)], ref, atol=1e-5, rtol=1e-5)
        else:
            full = logits(m, batch)
            for i, r in enumerate(rs):
                ref = logits(m, batch_of(backbone, [r]))[0]
                torch.testing.assert_close(full[i][batch["attention_mask"][i].bool()], ref, atol=1e-5, rtol=1e-5)


def test_soft_positions_match_manually_built_inputs_embeds(backbone):
    """The i-th soft position of the (encoder) input carries prompt vector i; nothing is prepended."""
    m = ptuning(backbone)
    rs = rows(backbone, "soft")
    batch = batch_of(backbone, rs, "left")
    model = backbone.model
    with torch.no_grad():
        dec = decoder_inputs(m, batch) if m.dims.is_encoder_decoder else None
        ours = logits(m, batch, dec)
        assert m.n_prepended == 0
        prompt = m.adapter_tensors()["prompt"]  # (p, hidden)
        for i, (ids, soft, e) in enumerate(rs):
            row = model.get_input_embeddings()(torch.tensor([ids]))[0].clone()  # (len, hidden)
            row[torch.tensor(soft)] = prompt  # the k-th soft position gets vector k
            if m.dims.is_encoder_decoder:
                ref = model(inputs_embeds=row[None], decoder_input_ids=dec[i:i + 1, :len(e.labels)]).logits[0]
                torch.testing.assert_close(ours[i, :len(e.labels)], ref, atol=1e-5, rtol=1e-5)
            else:
                ref = model(inputs_embeds=row[None]).logits[0]
                torch.testing.assert_close(ours[i][batch["attention_mask"][i].bool()], ref, atol=1e-5, rtol=1e-5)
        filled = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["soft_mask"], 123))
        assert torch.equal(ours, logits(m, filled, dec))  # the ids at soft positions are never read


def greedy_by_hand(m, ids, soft, steps):
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "soft_mask": torch.tensor([soft])}
    dec = torch.tensor([[m.backbone.model.config.decoder_start_token_id]])
    for _ in range(steps):
        with torch.no_grad():
            nxt = logits(m, batch, dec)[0, -1].argmax()
        dec = torch.cat([dec, nxt.view(1, 1)], 1)
    return dec[0, 1:].tolist()


@pytest.mark.parametrize("name", SEQ2SEQ)
@pytest.mark.parametrize("placement", ["prepended", "soft"])
def test_generate_matches_step_by_step_greedy(name, placement):
    bb = sharpened(name)
    m = ptuning(bb)
    rs = rows(bb, placement)
    batch = batch_of(bb, rs, "left")
    new = m.generate(batch["input_ids"], batch["attention_mask"], soft_mask=batch["soft_mask"], max_new_tokens=5,
                     num_beams=1, pad_token_id=bb.tokenizer.pad_token_id, **GEN)
    assert new.shape == (2, 5)  # only the new tokens
    for i, (ids, soft, _) in enumerate(rs):
        assert new[i].tolist() == greedy_by_hand(m, ids, soft, 5)
    assert not torch.equal(new[0], new[1])  # the input steers the decoder (at the default init it does not)


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_beam_search(name):
    """Width-3 beam search over two steps, prompts at soft positions, returns the best path it can see."""
    bb = sharpened(name)
    m = ptuning(bb)
    batch = batch_of(bb, rows(bb, "soft"), "left")
    beams = m.generate(batch["input_ids"], batch["attention_mask"], soft_mask=batch["soft_mask"], num_beams=3,
                       max_new_tokens=2, pad_token_id=bb.tokenizer.pad_token_id, **GEN)
    assert beams.shape == (2, 2)
    start = bb.model.config.decoder_start_token_id
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in batch.items() if k != "layout"}

        def next_logprobs(prefix, one=one):
            with torch.no_grad():
                return logits(m, one, torch.tensor([[start, *prefix]]))[0, -1].log_softmax(-1)
        assert beams[i].tolist() == best_of_two_step_beam(next_logprobs, 3)


def test_masked_models_do_not_generate():
    m = ptuning(load("tiny-bert"))
    ids = torch.tensor([[101, 2171, 102]])
    with pytest.raises(PtuneError, match="does not generate"):
        m.generate(ids, torch.ones_like(ids), max_new_tokens=2)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_matches_peft_p_tuning(name, encoder):
    """PEFT's P_TUNING with the same encoder weights gives the same logits (unpadded, prepended).

    PEFT's LSTM encoder_hidden_size is per direction (= our E / 2). seq2seq: PEFT's default
    num_transformer_submodules=2 runs the encoder over 2p embeddings and feeds the first p outputs
    to the encoder input. The MLP works row by row, so with our embedding in the first p rows the
    default is our computation; the bidirectional LSTM also reads the other p rows, so it equals
    ours only with num_transformer_submodules=1 (and differs at the default, checked below)."""
    peft = pytest.importorskip("peft")
    bb = load(name)
    H = bb.dims.hidden
    m = ptuning(bb, p=4, encoder=encoder)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    seq2seq = bb.kind == "seq2seq"

    def peft_model(submodules=None):
        config = peft.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM" if seq2seq else "FEATURE_EXTRACTION",
                                          num_virtual_tokens=4, encoder_reparameterization_type=encoder.upper(),
                                          encoder_hidden_size=H // 2 if encoder == "lstm" else H,
                                          num_transformer_submodules=submodules)
        pm = peft.get_peft_model(load(name).model, config)
        own = m.state_dict()
        with torch.no_grad():
            for k, v in pm.prompt_encoder["default"].state_dict().items():
                v[:len(own[k])] = own[k]  # same names; PEFT's 2p-row embedding keeps its own last p rows
        return pm

    rs = rows(bb, "prepended")[:1]
    batch = batch_of(bb, rs)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def peft_logits(pm):
        with torch.no_grad():
            if seq2seq:
                return pm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_inputs(m, batch)).logits
            return pm(input_ids=ids, attention_mask=mask).logits[:, 4:]

    with torch.no_grad():
        ours = logits(m, batch, decoder_inputs(m, batch) if seq2seq else None)
    exact = peft_model(1 if (seq2seq and encoder == "lstm") else None)
    assert (ours - peft_logits(exact)).abs().max().item() <= 1e-5
    if seq2seq and encoder == "lstm":
        assert (ours - peft_logits(peft_model())).abs().max().item() > 1e-4

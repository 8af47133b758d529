"""Level 2: P-tuning on tiny encoder-decoder (T5, BART) and masked (BERT) backbones, with the prompt
vectors prepended and at soft positions of the (encoder) input: counts, soft positions, PEFT's
P-tuning (tests/test_p_tuning.py covers decoder-only backbones, and what the adapter holds on
every backbone). What every method proves on every backbone (frozen weights, a falling loss, the
adapter round trip, padding, greedy and beam, soft positions included): test_contract.py."""

import pytest
import torch

from conftest import encoder_count, load
from ptune import methods
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.methods.p_tuning import insert_soft

BACKBONES = ["tiny-t5", "tiny-bart", "tiny-bert"]
P = 5
# Segments around which P soft positions go: (segments, soft positions per gap) and the target.
# seq2seq rows are encoder sources; BERT rows are clozes whose [MASK] word is the target.
SEQ2SEQ_ROWS = [(["name : Eagle", " | food : French"], [2, 1, 2], " The Eagle serves French food."),
                (["name : Mill"], [1, 4], " The Mill.")]
BERT_ROWS = [(["a great , moving film .", "it was [MASK] ."], [2, 2, 1], "good"), (["dull .", "it was [MASK] ."], [1, 3, 1], "bad")]


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


def decoder_inputs(m, batch):
    return m.backbone.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_parameter_counts(backbone, encoder):
    H = backbone.dims.hidden
    m = ptuning(backbone, p=7, encoder=encoder)
    assert sum(t.numel() for t in m.trainable_tensors().values()) == 7 * H + encoder_count(encoder, H, H)
    assert {k: tuple(v.shape) for k, v in m.adapter_tensors().items()} == {"prompt": (7, H)}  # stored: p x hidden


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


def test_masked_models_do_not_generate():
    m = ptuning(load("tiny-bert"))
    ids = torch.tensor([[101, 2171, 102]])
    with pytest.raises(PtuneError, match="does not generate"):
        m.generate(ids, torch.ones_like(ids), max_new_tokens=2)


@pytest.mark.parametrize("name", BACKBONES)
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

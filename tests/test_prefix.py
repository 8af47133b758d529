"""Level 2: prefix-tuning on tiny decoder-only backbones (GPT-2, Llama with grouped-query attention).
Encoder-decoders: test_prefix_seq2seq.py; BERT and P-tuning v2: test_p_tuning_v2.py."""

import re

import pytest
import torch

from ptune.adapter import save_adapter, load_adapter
from ptune import methods, models
from ptune.cli import compose
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.heads import lm_loss

BACKBONES = ["tiny-gpt2", "tiny-llama"]


def load(name):
    cfg = compose([f"model={name}"]).model
    return models.load(cfg.name, cfg.kind, cfg.source, tiny=dict(cfg.tiny), tokenizer=cfg.tokenizer)


@pytest.fixture(scope="module", params=BACKBONES)
def backbone(request):
    return load(request.param)


def prefix(backbone, p=5, **kw):
    torch.manual_seed(0)
    return methods.build("prefix", backbone, num_virtual_tokens=p, **kw)


def toy_batch(tok, texts=("name : Eagle | food : French", "name : Mill"), targets=(" The Eagle serves French food.", " The Mill.")):
    exs = []
    for s, t in zip(texts, targets):
        s_ids, t_ids = tok(s).input_ids, tok(t).input_ids + [tok.eos_token_id]
        exs.append(Example(s_ids + t_ids, [-100] * len(s_ids) + t_ids))
    return exs


def logits(method, input_ids, attention_mask):
    out = method.backbone.model(**method.model_inputs(input_ids, attention_mask))
    return out.logits


def test_parameter_counts(backbone):
    d = backbone.dims
    m = prefix(backbone, p=7)
    stored = sum(t.numel() for t in m.adapter_tensors().values())
    assert stored == 2 * d.n_layers * 7 * d.n_kv_heads * d.head_dim  # 2*L*p*d for multi-head attention
    mlp = d.hidden * 512 + 512 + 512 * (2 * d.n_layers * d.n_kv_heads * d.head_dim) + 2 * d.n_layers * d.n_kv_heads * d.head_dim
    assert sum(t.numel() for t in m.trainable_tensors().values()) == 7 * d.hidden + mlp
    flat = prefix(backbone, p=7, projection=False)
    assert sum(t.numel() for t in flat.trainable_tensors().values()) == stored


def test_training_touches_only_the_prefix_and_loss_falls(backbone):
    m = prefix(backbone)
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    batch = collate(toy_batch(backbone.tokenizer), backbone.tokenizer.pad_token_id)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, n = lm_loss(m, **batch)
        (loss / n).backward()
        assert all(p.grad is None for p in backbone.model.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_tensors().values())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    # a random tiny model's logits are nearly flat; a prefix moves them about 1 nat in 30 steps
    assert losses[-1] < losses[0] - 0.5
    for k, v in backbone.model.state_dict().items():
        assert torch.equal(v, frozen[k]), f"frozen weight {k} changed"


def test_adapter_roundtrip_gives_identical_logits(backbone, tmp_path):
    m = prefix(backbone)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_adapter(tmp_path / "adapter", m.adapter_tensors(), m.adapter_config())
    fresh = load(backbone.name)
    m2 = prefix(fresh, p=5)
    _, tensors = load_adapter(tmp_path / "adapter")
    m2.load_adapter_tensors(tensors)
    assert not list(m2.trainable_tensors())  # the loaded prefix is for inference only
    batch = collate(toy_batch(backbone.tokenizer), backbone.tokenizer.pad_token_id)
    with torch.no_grad():
        a = logits(m, batch["input_ids"], batch["attention_mask"])
        b = logits(m2, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_logits(backbone, side):
    m = prefix(backbone)
    exs = toy_batch(backbone.tokenizer)
    pad = backbone.tokenizer.pad_token_id
    with torch.no_grad():
        for i, e in enumerate(exs):
            alone = collate([e], pad)
            ref = logits(m, alone["input_ids"], alone["attention_mask"])[0]
            batch = collate(exs, pad, padding_side=side)
            full = logits(m, batch["input_ids"], batch["attention_mask"])[i]
            rows = batch["attention_mask"][i].bool()
            torch.testing.assert_close(full[rows], ref, atol=1e-5, rtol=1e-5)


def test_generate_matches_step_by_step_greedy(backbone):
    m = prefix(backbone)
    tok = backbone.tokenizer
    exs = toy_batch(tok)
    batch = collate(exs, tok.pad_token_id, padding_side="left")
    new = m.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5, do_sample=False,
                     num_beams=1, eos_token_id=None, pad_token_id=tok.pad_token_id)
    for i, e in enumerate(exs):
        seq = torch.tensor([e.input_ids])
        for _ in range(5):
            with torch.no_grad():
                nxt = logits(m, seq, torch.ones_like(seq))[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
        assert new[i].tolist() == seq[0, len(e.input_ids):].tolist()


def test_beam_search_with_prefix(backbone):
    """Beam search runs through the prefix cache; with one beam it equals greedy."""
    m = prefix(backbone)
    tok = backbone.tokenizer
    batch = collate(toy_batch(tok), tok.pad_token_id, padding_side="left")
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    beams = m.generate(batch["input_ids"], batch["attention_mask"], num_beams=3, **kw)
    assert beams.shape == (2, 4)
    greedy = m.generate(batch["input_ids"], batch["attention_mask"], num_beams=1, **kw)
    # the best beam scores at least as high as the greedy sequence under the same prefixed model
    def score(seq_new, i):
        ids = torch.cat([batch["input_ids"][i:i + 1], seq_new.view(1, -1)], 1)
        mask = torch.cat([batch["attention_mask"][i:i + 1], torch.ones(1, seq_new.numel(), dtype=torch.long)], 1)
        with torch.no_grad():
            lp = logits(m, ids, mask).log_softmax(-1)[0, -seq_new.numel() - 1:-1]
        return lp.gather(1, seq_new.view(-1, 1)).sum().item()
    for i in range(2):
        assert score(beams[i], i) >= score(greedy[i], i) - 1e-4


@pytest.mark.parametrize("name", BACKBONES)
def test_matches_peft_prefix_tuning(name):
    """PEFT's PrefixTuning (no projection) given the same prefix gives the same logits."""
    peft = pytest.importorskip("peft")
    bb = load(name)
    m = prefix(bb, p=4, projection=False)
    pm = peft.get_peft_model(load(name).model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(m.adapter_tensors()["prefix"])
    tok = bb.tokenizer
    ids = torch.tensor([tok("name : Eagle | food : French. The Eagle").input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = logits(m, ids, mask)
        theirs = pm(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_words_init_equals_the_text_written_in_front(backbone):
    """init=words without projection (paper §7.3): the prefix is the frozen LM's keys/values of the
    words, so the prefixed model reads x exactly as the plain model reads [words; x]."""
    tok = backbone.tokenizer
    text = "Describe the restaurant:"
    words = tok(text, add_special_tokens=False).input_ids
    m = prefix(backbone, p=len(words), projection=False, init="words", init_text=text)
    assert all(p.requires_grad for p in m.trainable_tensors().values())  # a starting point, then trained
    x = torch.tensor([tok(" name : Eagle | food : French").input_ids])
    with torch.no_grad():
        ours = logits(m, x, torch.ones_like(x))
        ref = backbone.model(input_ids=torch.cat([torch.tensor([words]), x], 1)).logits[:, len(words):]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, key", [(dict(init="vocab"), "method.init"), (dict(init="words"), "method.init_text"),
                                     (dict(dropout=1.0), "method.dropout"), (dict(mid_dim=0), "method.mid_dim")])
def test_bad_options_name_the_key(backbone, kw, key):
    with pytest.raises(PtuneError, match=re.escape(key)):
        prefix(backbone, **kw)


def test_adapter_of_another_shape_or_model_is_refused(backbone):
    m = prefix(backbone, p=5)
    with pytest.raises(PtuneError, match="num_virtual_tokens"):
        m.load_adapter_tensors({"prefix": torch.zeros(6, m.stacks[0].width)})
    with pytest.raises(PtuneError, match="no tensor 'prefix'"):
        m.load_adapter_tensors({"decoder_prefix": torch.zeros(5, m.stacks[0].width)})

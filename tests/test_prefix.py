"""Level 2: prefix-tuning on tiny decoder-only backbones (GPT-2, Llama with grouped-query attention):
counts, PEFT's prefix tuning, the words init and bad options. Encoder-decoders: test_prefix_seq2seq.py;
BERT and P-tuning v2: test_p_tuning_v2.py; what every method proves on every backbone (frozen
weights, a falling loss, the adapter round trip, padding, greedy and beam): test_contract.py."""

import re

import pytest
import torch

from conftest import load
from ptune import methods
from ptune.errors import PtuneError

BACKBONES = ["tiny-gpt2", "tiny-llama"]


def prefix(backbone, p=5, **kw):
    torch.manual_seed(0)
    return methods.build("prefix", backbone, num_virtual_tokens=p, **kw)


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

"""Level 2: P-tuning v2 (deep prompts as key/value prefixes + a linear head) on every tiny backbone:
defaults, counts, prefix dropout, the LM head, prefixes on BERT through its own cache, and PEFT's
prefix tuning as the reference on BERT. What every method proves on every backbone (frozen
weights, a falling loss, the adapter round trip, padding; P-tuning v2 with the linear head on
every backbone): test_contract.py."""

import pytest
import torch

from conftest import class_batch, load
from ptune import methods
from ptune.cli import compose
from ptune.config import method_kwargs
from ptune.data import Example, collate
from ptune.errors import PtuneError
from ptune.heads.linear import LinearHead, class_logits
from ptune.heads.lm import lm_loss, seq2seq_loss
from ptune.methods import kv

BACKBONES = ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bart"]


def ptv2(backbone, p=4, **kw):
    torch.manual_seed(0)
    m = methods.build("p-tuning-v2", backbone, num_virtual_tokens=p, **kw)
    m.attach_head(LinearHead(backbone.dims.hidden, 2, dropout=0.1, seed=0))
    return m


def test_defaults_follow_the_paper():
    """conf/method/p-tuning-v2.yaml: no reparameterization, 20 prompts, prefix dropout 0.1."""
    kwargs = method_kwargs(compose(["method=p-tuning-v2"]))
    assert (kwargs["projection"], kwargs["num_virtual_tokens"], kwargs["dropout"], kwargs["init"]) == (False, 20, 0.1, "random")
    m = methods.build("p-tuning-v2", load("tiny-bert"))
    assert (m.num_virtual_tokens, m.projection, m.dropout) == (20, False, 0.1)


def test_parameter_counts(backbone):
    m = ptv2(backbone, p=6)
    stored = sum(t.numel() for t in m.adapter_tensors().values())
    assert stored == sum(2 * s.n_layers * 6 * s.kv_heads * s.head_dim for s in m.stacks)
    d = backbone.dims
    if backbone.kind == "seq2seq":
        assert stored == 2 * 6 * d.n_heads * d.head_dim * (d.n_encoder_layers + 2 * d.n_layers)
    else:
        assert stored == 2 * d.n_layers * 6 * d.n_kv_heads * d.head_dim
    head = d.hidden * 2 + 2
    assert sum(t.numel() for t in m.trainable_tensors().values()) == stored + head  # no MLP: P itself trains
    with_mlp = sum(p.numel() for p in ptv2(backbone, p=6, projection=True).prefixes.parameters())
    mlp = sum(6 * d.hidden + d.hidden * 512 + 512 + 513 * s.width for s in m.stacks)
    assert with_mlp == mlp


def test_prefix_dropout_only_in_training(backbone):
    """dropout draws a mask per example while the backbone trains, and nothing in eval mode."""
    m = ptv2(backbone, dropout=0.5)
    stack = m.stacks[0]
    flat = m.prefixes[stack.name].flat()
    ev = kv.to_layers(flat, stack, 2, torch.float32, m.dropout, training=False)
    tr = kv.to_layers(flat, stack, 2, torch.float32, m.dropout, training=True)
    assert torch.equal(ev[0][0][0], ev[0][0][1])
    k = tr[0][0]  # (batch, heads, p, head_dim)
    assert not torch.equal(k[0], k[1])  # independent masks per example
    kept = k[0] != 0
    torch.testing.assert_close(k[0][kept], 2 * ev[0][0][0][kept])  # survivors scaled by 1 / (1 - 0.5)
    batch = class_batch(backbone.tokenizer)
    with torch.no_grad():  # eval: deterministic
        a = class_logits(m, batch["input_ids"], batch["attention_mask"])
        assert torch.equal(a, class_logits(m, batch["input_ids"], batch["attention_mask"]))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5"])
def test_runs_with_the_lm_head(name):
    """P-tuning v2 is a prefix method: generation tasks train and decode with it too."""
    bb = load(name)
    m = ptv2(bb)
    tok = bb.tokenizer
    src, tgt = tok("name : Eagle").input_ids, tok(" The Eagle.").input_ids + [tok.eos_token_id]
    if bb.kind == "seq2seq":
        batch = collate([Example(src, tgt, "seq2seq")], tok.pad_token_id)
        loss, n = seq2seq_loss(m, batch["input_ids"], batch["attention_mask"], batch["labels"])
    else:
        batch = collate([Example(src + tgt, [-100] * len(src) + tgt)], tok.pad_token_id)
        loss, n = lm_loss(m, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    assert m.prefixes[m.stacks[0].name].prefix.grad.abs().sum() > 0
    ids = torch.tensor([src])
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, forced_eos_token_id=None)
    assert m.generate(ids, torch.ones_like(ids), num_beams=2, **kw).shape == (1, 4)


# -- BERT: prefixes through transformers' own cache --------------------------------------------
@pytest.mark.parametrize("method", ["p-tuning-v2", "prefix"])
def test_bert_matches_peft_prefix_tuning(method):
    """PEFT's PrefixTuning (no projection) on BERT is the official P-tuning v2 computation: the prefix
    as past_key_values, the mask extended by p, positions numbered after the cache. Same tensors,
    same logits, also for a right-padded batch (PEFT counts pads in positions; at the end they
    shift nothing)."""
    peft = pytest.importorskip("peft")
    bb = load("tiny-bert")
    torch.manual_seed(0)
    m = methods.build(method, bb, num_virtual_tokens=4, projection=False)
    pm = peft.get_peft_model(load("tiny-bert").model,
                             peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(m.adapter_tensors()["prefix"])
    batch = class_batch(bb.tokenizer)
    with torch.no_grad():
        ours = bb.model(**m.model_inputs(batch["input_ids"], batch["attention_mask"])).logits
        theirs = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5


def test_encoder_attention_function_equals_berts_cache_route():
    """kv.py's AttentionInterface function (the encoder-decoder encoders' route) gives BERT exactly
    the hidden states of BERT's own past_key_values route, padding included."""
    bb = load("tiny-bert")
    m = methods.build("prefix", bb, num_virtual_tokens=3, projection=False)
    batch = class_batch(bb.tokenizer, side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    base = bb.model.base_model
    with torch.no_grad():
        inputs = m.model_inputs(ids, mask)
        cache_route = base(**inputs).last_hidden_state
        base.set_attn_implementation("ptune_prefix_sdpa")
        try:
            prefix = kv.EncoderPrefix(m._layers("encoder", ids.shape[0]))
            wrapped = base(input_ids=ids, attention_mask=mask, position_ids=inputs["position_ids"],
                           **{kv.PREFIX_KWARG: prefix}).last_hidden_state
            plain = base(input_ids=ids, attention_mask=mask, position_ids=inputs["position_ids"]).last_hidden_state
        finally:
            base.set_attn_implementation("sdpa")
    real = mask.bool()
    torch.testing.assert_close(wrapped[real], cache_route[real], atol=1e-6, rtol=1e-6)
    assert (plain[real] - cache_route[real]).abs().max() > 1e-3  # without the keyword: the plain model


def test_bert_does_not_generate():
    m = methods.build("p-tuning-v2", load("tiny-bert"), num_virtual_tokens=2)
    ids = torch.tensor([[101, 102]])
    with pytest.raises(PtuneError, match="task.head=linear"):
        m.generate(ids, torch.ones_like(ids), max_new_tokens=2)


def test_bert_words_init_is_berts_first_layer_keys_and_values():
    """init=words on BERT: layer 0's slice of the prefix is BERT's own key/value projection of the
    words' embeddings (positions 0..p-1, no special tokens), computed here without any cache."""
    bb = load("tiny-bert")
    text = "a great movie"
    ids = bb.tokenizer(text, add_special_tokens=False).input_ids
    m = methods.build("p-tuning-v2", bb, num_virtual_tokens=len(ids), init="words", init_text=text)
    bert = bb.model.base_model
    with torch.no_grad():
        hidden = bert.embeddings(input_ids=torch.tensor([ids]))[0]  # (p, hidden)
        attn = bert.encoder.layer[0].attention.self
        flat = m.adapter_tensors()["prefix"]  # (p, L*2*hidden): [layer 0 K | layer 0 V | layer 1 K | ...]
    h = bb.dims.hidden
    torch.testing.assert_close(flat[:, :h], attn.key(hidden))
    torch.testing.assert_close(flat[:, h:2 * h], attn.value(hidden))

"""Level 2: prefix-tuning on tiny encoder-decoders (T5, BART): encoder self-, decoder self- and
cross-attention prefixes, generation through the cache, and the K/V plumbing checked against
references that do not use it. What every method proves on every backbone (frozen weights, a
falling loss, the adapter round trip, padding, greedy and beam): test_contract.py."""

import pytest
import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from conftest import load
from ptune import methods
from ptune.data import Example, collate
from ptune.heads.lm import seq2seq_forward
from ptune.methods import kv
from ptune.methods import prefix as prefix_module

BACKBONES = ["tiny-t5", "tiny-bart"]
# no forced end token (BART's config forces one at max length), no early stop: compare whole sequences
GEN = dict(do_sample=False, eos_token_id=None, forced_eos_token_id=None, max_new_tokens=5)


def prefix(backbone, p=4, **kw):
    torch.manual_seed(0)
    return methods.build("prefix", backbone, num_virtual_tokens=p, **kw)


def toy(tok, sources=("name : Eagle | food : French", "name : Mill", "name : The Vaults | area : riverside"),
        targets=(" The Eagle serves French food.", " The Mill.", " The Vaults is by the river.")):
    return [Example(tok(s).input_ids, tok(t).input_ids + [tok.eos_token_id], "seq2seq") for s, t in zip(sources, targets)]


def decoder_logits(method, batch):
    dec = method.backbone.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return seq2seq_forward(method, batch["input_ids"], batch["attention_mask"], dec).logits  # (batch, tgt, vocab)


def test_parameter_counts(backbone):
    d = backbone.dims
    width = 2 * d.n_heads * d.head_dim  # per layer: keys and values of all heads
    m = prefix(backbone, p=7)
    tensors = m.adapter_tensors()
    assert sorted(tensors) == ["cross_prefix", "decoder_prefix", "encoder_prefix"]
    stored = sum(t.numel() for t in tensors.values())
    assert stored == 7 * width * (d.n_encoder_layers + d.n_layers + d.n_layers)  # 2*L_enc*p*d + 2*L_dec*p*d + 2*L_dec*p*d
    mlp = lambda layers: 7 * d.hidden + d.hidden * 512 + 512 + 512 * layers * width + layers * width
    assert sum(t.numel() for t in m.trainable_tensors().values()) == mlp(d.n_encoder_layers) + 2 * mlp(d.n_layers)
    assert sum(t.numel() for t in prefix(backbone, p=7, projection=False).trainable_tensors().values()) == stored


def test_each_prefix_reaches_the_model(backbone):
    """Changing any one of the three prefixes changes the decoder's logits."""
    m = prefix(backbone, projection=False)
    batch = collate(toy(backbone.tokenizer)[:1], backbone.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = decoder_logits(m, batch)
        for name in ("encoder", "decoder", "cross"):
            m.prefixes[name].prefix.add_(1.0)
            assert (decoder_logits(m, batch) - ref).abs().max() > 1e-3, name
            m.prefixes[name].prefix.sub_(1.0)


def test_cross_prefix_equals_prepended_encoder_states(backbone):
    """A cross prefix holding the cross-attention keys/values of extra encoder states E' gives the
    logits of E' written in front of the encoder output: the pre-filled cross cache really gets
    the encoder's keys/values appended behind it (is_updated is reset) and the mask covers both."""
    m = prefix(backbone)
    model = backbone.model
    batch = collate(toy(backbone.tokenizer)[:1], backbone.tokenizer.pad_token_id)
    extra = torch.randn(1, m.num_virtual_tokens, backbone.dims.hidden)  # E': (1, p, hidden)
    with torch.no_grad():
        # the model's own cross-attention projections of E', read back from a cache it fills
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        model(encoder_outputs=BaseModelOutput(last_hidden_state=extra), decoder_input_ids=batch["labels"][:, :1],
              use_cache=True, **{kv.cache_kwarg(model): cache})
        cross = [(layer.keys, layer.values) for layer in cache.cross_attention_cache.layers]
        m.prefixes["cross"].set_directly(kv.from_layers(cross), trainable=False)
        dec = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        inputs = m.model_inputs(batch["input_ids"], batch["attention_mask"])
        ours = model(**inputs, decoder_input_ids=dec).logits
        # reference: no cross prefix, E' prepended to the encoder states
        encoder = inputs["encoder_outputs"].last_hidden_state
        inputs["encoder_outputs"] = BaseModelOutput(last_hidden_state=torch.cat([extra, encoder], 1))
        inputs[kv.cache_kwarg(model)] = kv.encoder_decoder_cache(m._layers("decoder", 1), None)
        ref = model(**inputs, decoder_input_ids=dec).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_generate_logits_match_the_training_forward(backbone):
    """Every step's logits inside generate() (cache reused step to step) equal a full forward's."""
    m = prefix(backbone, projection=False)
    batch = collate(toy(backbone.tokenizer), backbone.tokenizer.pad_token_id)
    with torch.no_grad():
        inputs = m._seq2seq_inputs(batch["input_ids"], batch["attention_mask"], batch["input_ids"].shape[0])
        inputs.pop("use_cache")
        out = backbone.model.generate(**inputs, num_beams=1, output_logits=True, return_dict_in_generate=True, **GEN)
        full = seq2seq_forward(m, batch["input_ids"], batch["attention_mask"], out.sequences[:, :-1]).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full, atol=1e-4, rtol=1e-4)


def test_words_init_takes_the_models_own_keys_and_values(backbone, monkeypatch):
    """init=words: the encoder, decoder and cross prefixes are the frozen model's keys/values of the
    words (read back here through transformers' own caches); with projection the MLP is fitted to them
    (150 of the paper code's 500 Adam steps here, to keep the test short)."""
    monkeypatch.setattr(prefix_module, "WORDS_FIT_STEPS", 150)
    tok = backbone.tokenizer
    m = prefix(backbone, p=4, projection=False, init="words", init_text="summarize the table")
    ids = torch.tensor([(tok("summarize the table", add_special_tokens=False).input_ids * 4)[:4]])
    model = backbone.model
    with torch.no_grad():
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        model(input_ids=ids, decoder_input_ids=ids, use_cache=True, **{kv.cache_kwarg(model): cache})
    for name, part in (("decoder", cache.self_attention_cache), ("cross", cache.cross_attention_cache)):
        expected = kv.from_layers([(layer.keys, layer.values) for layer in part.layers])
        torch.testing.assert_close(m.adapter_tensors()[f"{name}_prefix"], expected)
    assert m.adapter_tensors()["encoder_prefix"].abs().sum() > 0
    assert all(p.requires_grad for p in m.trainable_tensors().values())  # words are a start, then trained
    fitted = prefix(backbone, p=4, init="words", init_text="summarize the table")  # projection: MLP regression
    for key, target in m.adapter_tensors().items():  # from a random MLP's relative error ~1 to < 1e-2
        assert (fitted.adapter_tensors()[key] - target).pow(2).mean() < 1e-2 * target.pow(2).mean()


def test_encoder_prefix_sdpa_equals_eager(backbone):
    """The encoder's prefix attention (mask, and for T5 the relative bias columns) agrees across
    the two implementations it wraps."""
    eager = load(backbone.name)
    eager.model.set_attn_implementation("eager")
    a, b = prefix(backbone), prefix(eager)
    assert eager.model.get_encoder().config._attn_implementation == "ptune_prefix_eager"
    batch = collate(toy(backbone.tokenizer), backbone.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(decoder_logits(a, batch), decoder_logits(b, batch), atol=1e-5, rtol=1e-5)


def test_t5_prefix_bias_puts_the_prefix_before_the_first_token():
    bb = load("tiny-t5")
    prefix(bb)
    attn = kv.relative_bias_module(bb.model.get_encoder())
    bias = kv.prefix_position_bias(attn, 6, 3, "cpu")  # (1, heads, 6, 3)
    full = attn.compute_bias(6, 9, past_seen_tokens=3)
    assert torch.equal(full[..., 3:], attn.compute_bias(6, 6))  # real-to-real bias unchanged by the shift
    # query i to prefix key j: relative position j - 3 - i, the bias of a key 3 - j + i places to the left
    left = attn.compute_bias(1, 10, past_seen_tokens=9)[0, :, 0]  # (heads, 10): key k at relative k - 9
    for i in range(6):
        for j in range(3):
            assert torch.equal(bias[0, :, i, j], left[:, 9 + (j - 3 - i)])


@pytest.mark.parametrize("name", BACKBONES)
def test_decoder_prefix_matches_peft(name):
    """PEFT's SEQ_2_SEQ_LM prefix tuning prefixes only the decoder's self-attention (its cross part is
    dropped, the encoder untouched). Given the same per-layer tensors, ptune's EncoderDecoderCache
    route (positions, masks, T5's relative bias) computes the same logits. PEFT pairs its flat
    prefix with layers in its own way: cat([kv, kv]) then split(4) gives decoder layer j the
    keys/values of flat layer 2j mod L, so the tensors are handed over in that pairing."""
    peft = pytest.importorskip("peft")
    bb = load(name)
    m = prefix(bb, projection=False)
    pm = peft.get_peft_model(load(name).model, peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(m.adapter_tensors()["decoder_prefix"])
    n = bb.dims.n_layers
    layers = m._layers("decoder", 1)
    ex = toy(bb.tokenizer)[0]
    ids, dec = torch.tensor([ex.input_ids]), bb.model.prepare_decoder_input_ids_from_labels(labels=torch.tensor([ex.labels]))
    with torch.no_grad():
        cache = kv.encoder_decoder_cache([layers[2 * j % n] for j in range(n)], None)
        ours = bb.model(input_ids=ids, decoder_input_ids=dec, use_cache=False, **{kv.cache_kwarg(bb.model): cache}).logits
        theirs = pm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
    assert (ours - theirs).abs().max().item() <= 1e-5

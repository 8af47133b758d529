"""Prefix-tuning — Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation".

Trainable key/value prefixes of length p in every attention layer of a frozen LM. Which layers
(`kv.stacks_of`): a decoder-only model's self-attention; BERT's self-attention; for an
encoder-decoder, as the paper prescribes (§4.2: prefixes "for both encoder and decoder") and as
its BART code builds them, three separate prefixes: encoder self-attention, decoder
self-attention and decoder cross-attention. How each reaches the model: `ptune/methods/kv.py`.

Reparameterization (paper §4.3, `projection: true`): each prefix is P = MLP(P') with its own P'
(p, embed_dim) and its own MLP Linear(embed_dim, mid_dim) - Tanh - Linear(mid_dim, width), mid_dim
512 -- the BART code's three pairs `wte`/`control_trans` (decoder), `wte_enc`/`control_trans_enc`
(encoder), `wte2`/`control_trans2` (cross). After training only P is needed: the adapter stores
the collapsed prefixes; checkpoints (the training state) keep P' and the MLPs.

Adapter tensors, each (p, L * 2 * kv_heads * head_dim) in PEFT's prompt_embeddings order
([layer 0 K, layer 0 V, layer 1 K, ...]): `prefix` on single-stack models (a rename to PEFT's
`prompt_embeddings`); `encoder_prefix`, `decoder_prefix`, `cross_prefix` on encoder-decoders.
Stored count: 2 * L * p * kv_heads * head_dim per stack, i.e. for T5/BART
2*L_enc*p*d + 2*L_dec*p*d + 2*L_dec*p*d (d = heads * head_dim).
Trainable with projection, per stack: p*E + E*M + M + M*W + W (E = embed_dim, M = mid_dim,
W = 2*L*kv_heads*head_dim); without: the stored count.

Initialisation (`init`): `random` (P' ~ N(0, 1) and PyTorch's Linear init; without projection
P ~ N(0, 1), PEFT's init); `words` (the paper's initialization study, §7: "activations of real
words"): the frozen LM reads `init_text` (its tokens repeated or cut to p) and each layer's keys
and values of those tokens become the prefix -- for an encoder-decoder the encoder's self-attention
keys/values (encoder reads the words), the decoder's (decoder reads the words) and the
cross-attention's (projections of the words' encoder states). Without projection they are P
itself. With projection P is not a free tensor; we do what the paper's code does
(`lowdata_init_train2/3`): the MLP alone is fitted to the activations by MSE with Adam, lr 1e-4,
500 steps, from its random init. On a decoder-only model, words without projection equal the
prompt text written in front of the input (tested).

Positions: decoder-only and BERT number real tokens from p from the attention mask (PEFT and the
official P-tuning v2 code number them after the cache length, p, too; ours ignores pads, so left-
and right-padded rows agree). Encoder-decoder encoders read their rows real-tokens-first at 0..
(BART's learned positions take no position ids; the prefix there has no position). Decoders count
on from the cache as transformers does: BART's decoder tokens take learned positions p, p+1, ...
(as in PEFT; Li & Liang's BART code, on transformers 3.x, numbered them from 0 whatever the
prefix), and T5's relative bias puts the prefix just before the first token (kv.py).

Differences from PEFT 0.21's PrefixTuning: on an encoder-decoder PEFT prefixes only the decoder's
self-attention (its cross part is discarded: `cross_attention_cache = DynamicCache()`) and leaves
the encoder alone; its flat prefix reaches decoder layer j as flat layer 2j mod L (cat([kv, kv])
then split(4)), so with L > 1 some layers share one slot; decoder-only positions there count pads.
Given PEFT's subset and pairing, the logits agree (tests). `dropout` on the prefix (Li & Liang's
prefix_dropout, 0 by default) has no PEFT counterpart. Activation checkpointing of the frozen backbone
(trainer.gradient_checkpointing) works with prefixes on causal and encoder models: PEFT refuses it for
prefix tuning (issue #869) because transformers' checkpointed layers drop the cache that carries the
prefix; ptune keeps the cache and makes it read-only (kv.dynamic_cache), so a recomputed layer sees the
same prefix (tests/test_checkpointing.py). On encoder-decoders it is refused (the cross cache is written).
Generation: decoder-only models get p placeholder ids in front of the prompt so that generate()
numbers its cache from p; encoder-decoders pass encoder_outputs, the extended mask and the cache
to generate(), which decodes from the decoder start token (greedy and beam search alike).

--- `method=p-tuning-v2` -------------------------------------------------------------------------
P-tuning v2 — Liu, Ji, Fu, Tam, Du, Yang & Tang 2022, "P-Tuning v2: Prompt Tuning Can Be
Comparable to Fine-tuning Universally Across Scales and Tasks" (ACL 2022).

Deep prompt tuning for NLU: continuous prompts in every layer of a frozen LM, as key/value
prefixes of every attention (§3.2; the official code, THUDM/P-tuning-v2, passes them to BertModel
as past_key_values), read out by a randomly initialised linear classification head on the
tokens, as in BERT, instead of a verbalizer (§3.3; ptune: `task.head=linear`, [CLS] on BERT, the
last token on decoder-only models, the decoder's first state on encoder-decoders). The K/V
plumbing is prefix-tuning's (`Prefix`, `kv.py`), so every backbone works, and the lm head too.
What differs from `method=prefix` is the paper's recipe, in the defaults of conf/method/p-tuning-v2.yaml
(the registry maps `p-tuning-v2` to this class; no Python restates them):
- `projection: false`: the prefix is trained directly; the paper finds the reparameterization
  MLP's usefulness "depends on tasks and datasets" (§3.3; it helps RTE and CoNLL04, not BoolQ and
  CoNLL12), and its code's `prefix_projection` defaults to False. `true` gives its PrefixEncoder:
  Embedding(p, hidden) - Linear(hidden, 512) - Tanh - Linear(512, L * 2 * hidden);
- `num_virtual_tokens: 20`: "simple classification tasks prefer shorter prompts (less than 20);
  hard sequence labeling tasks prefer longer ones (around 100)" (§3.3); the official scripts use
  20 for RTE and 40 for BoolQ (BERT-large);
- `dropout: 0.1`: the official code applies the model's hidden_dropout_prob (0.1) to the prefix
  keys/values in training (`self.dropout(past_key_values)`), an independent mask per example;
- init `random`: nn.Embedding's N(0, 1), as the official PrefixEncoder.
Stored and trainable counts are prefix-tuning's (above): without projection
2 * L * p * kv_heads * head_dim per stack, trained and stored alike.

Where ptune differs from the paper: the paper evaluates encoders (BERT, RoBERTa, DeBERTa, GLM);
on decoder-only and encoder-decoder backbones ptune places the prompts as prefix-tuning does
(encoder-decoders: encoder self-, decoder self- and cross-attention). Positions on BERT: real
tokens are numbered from p, as the official code (transformers 4.x BertEmbeddings numbered them
after the cache length) and PEFT do, counting only real tokens. Multi-task pre-training of the
prompts (§3.3, optional in the paper) is not provided.

Differences from PEFT: PEFT has no separate P-tuning v2 method; its PrefixTuning (whose
PrefixEncoder is "based on" P-tuning v2's) with prefix_projection=False computes exactly this on
BERT (tested: identical logits), without the prefix dropout, and on encoder-decoders prefixes the
decoder's self-attention only (above).
"""

from __future__ import annotations

import torch
from torch import nn

from ptune.errors import PtuneError
from ptune.methods import kv
from ptune.methods.base import Method, real_tokens_first

INITS = ("random", "words")
WORDS_FIT_STEPS, WORDS_FIT_LR = 500, 1e-4  # Li & Liang's lowdata_init_train: 500 Adam steps at lr 1e-4


class Prefix(Method):
    name = "prefix"
    acts_on = "kv"
    peft_type = "PREFIX_TUNING"

    def __init__(self, backbone, *, num_virtual_tokens: int, projection: bool, mid_dim: int, embed_dim: int | None,
                 init: str, init_text: str | None, dropout: float, **_):
        super().__init__(backbone)
        if init not in INITS:
            raise PtuneError(f"method.init={init!r} is not one of {', '.join(INITS)}; use method.init=random")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise PtuneError(f"method.dropout={dropout!r} is invalid: must be a number in [0, 1)")
        for key, value in (("mid_dim", mid_dim), ("embed_dim", embed_dim)):
            if projection and not (isinstance(value, int) and value >= 1) and not (key == "embed_dim" and value is None):
                raise PtuneError(f"method.{key}={value!r} is invalid: must be an integer >= 1")
        self.stacks = kv.stacks_of(backbone)
        self._cache = kv.cache_kwarg(backbone.model)  # the keyword that carries the prefix cache
        self.num_virtual_tokens = num_virtual_tokens
        self.projection, self.init, self.dropout = projection, init, dropout
        self.mid_dim, self.embed_dim = mid_dim, embed_dim or self.dims.hidden
        self.prefixes = nn.ModuleDict(
            {s.name: kv.PrefixParams(num_virtual_tokens, s.width, projection, self.embed_dim, mid_dim)
             for s in self.stacks})
        self._bias_module = [None]  # T5's relative-bias attention, kept out of the module tree
        if backbone.kind == "seq2seq":
            kv.install_encoder_prefix(backbone.model)
            self._bias_module = [kv.relative_bias_module(backbone.model.get_encoder())]
        if init == "words":
            self._init_from_words(init_text)

    # -- initialisation ------------------------------------------------------------------------
    def _init_from_words(self, text: str | None) -> None:
        ids = self.backbone.tokenizer(text, add_special_tokens=False).input_ids if text else []
        if not ids:
            raise PtuneError(f"method.init=words needs a non-empty method.init_text (got {text!r}); "
                             f"set method.init_text='...' or use method.init=random")
        p = self.num_virtual_tokens
        ids = torch.tensor((ids * (p // len(ids) + 1))[:p])  # (p,), repeated or cut
        for name, target in word_activations(self.backbone, ids).items():
            params = self.prefixes[name]
            if params.projection:
                params.fit_mlp(target, WORDS_FIT_STEPS, WORDS_FIT_LR)
            else:
                params.set_directly(target, trainable=True)

    # -- forward -------------------------------------------------------------------------------
    def _layers(self, name: str, batch: int):
        stack = next(s for s in self.stacks if s.name == name)
        dtype = next(self.backbone.model.parameters()).dtype
        return kv.to_layers(self.prefixes[name].flat(), stack, batch, dtype, self.dropout,
                            training=self.backbone.model.training)

    def _mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        ones = attention_mask.new_ones(attention_mask.shape[0], self.num_virtual_tokens)
        return torch.cat([ones, attention_mask], dim=1)  # (batch, p + seq)

    def model_inputs(self, input_ids, attention_mask):
        if self.backbone.kind == "seq2seq":
            return self._seq2seq_inputs(input_ids, attention_mask, input_ids.shape[0])
        name = self.stacks[0].name
        cache = kv.dynamic_cache(self._layers(name, input_ids.shape[0]), self.backbone.model.config,
                                 read_only=self.checkpointed)  # a recomputed layer sees the prefix again
        inputs = {"input_ids": input_ids, "attention_mask": self._mask(attention_mask), "use_cache": False,
                  self._cache: cache}
        pos = self._position_ids(attention_mask, self.num_virtual_tokens)
        if pos is not None:
            inputs["position_ids"] = pos
        return inputs

    def _seq2seq_inputs(self, input_ids, attention_mask, cache_rows: int) -> dict:
        """The encoder runs here, with its prefix; the decoder prefixes ride in a cache of cache_rows rows."""
        attention_mask, input_ids = real_tokens_first(attention_mask, input_ids)
        batch, seq = input_ids.shape
        bias_module = self._bias_module[0]
        bias = None if bias_module is None else kv.prefix_position_bias(bias_module, seq, self.num_virtual_tokens,
                                                                        input_ids.device)
        encoder_prefix = kv.EncoderPrefix(self._layers("encoder", batch), bias)
        encoder_outputs = self.backbone.model.get_encoder()(
            input_ids=input_ids, attention_mask=attention_mask, **{kv.PREFIX_KWARG: encoder_prefix})
        cache = kv.encoder_decoder_cache(self._layers("decoder", cache_rows), self._layers("cross", cache_rows))
        # the extended mask is the decoder's cross-attention mask: [p prefix columns; encoder]
        return {"encoder_outputs": encoder_outputs, "attention_mask": self._mask(attention_mask), self._cache: cache,
                "use_cache": False}

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **gen_kwargs):
        kind = self.backbone.kind
        if kind not in ("causal", "seq2seq"):
            raise PtuneError(f"model.kind={kind} models do not generate; use a classification task (task.head=linear)")
        # generate() copies each row num_beams times for beam search, num_return_sequences times otherwise
        beams = gen_kwargs.get("num_beams") or 1
        rows = input_ids.shape[0] * (beams if beams > 1 else gen_kwargs.get("num_return_sequences") or 1)
        if kind == "seq2seq":
            inputs = self._seq2seq_inputs(input_ids, attention_mask, rows)
            inputs.pop("use_cache")
            return self.backbone.model.generate(**inputs, **gen_kwargs)[:, 1:]  # without the decoder start token
        # p placeholder ids stand for the prefix already in the cache: generate() then starts its
        # cache positions at p and feeds only the real prompt. The placeholders are never embedded.
        placeholder = input_ids.new_full((input_ids.shape[0], self.num_virtual_tokens),
                                         self.backbone.tokenizer.pad_token_id)
        cache = kv.dynamic_cache(self._layers("decoder", rows), self.backbone.model.config)
        out = self.backbone.model.generate(input_ids=torch.cat([placeholder, input_ids], dim=1),
                                           attention_mask=self._mask(attention_mask), **{self._cache: cache},
                                           **gen_kwargs)
        return out[:, self.num_virtual_tokens + input_ids.shape[1]:]

    def checkpoint_activations(self) -> None:
        if self.backbone.kind == "seq2seq":
            raise PtuneError(f"trainer.gradient_checkpointing=true with method={self.name} on an encoder-decoder "
                             f"({self.backbone.name}) is not built: the decoder's cross-attention cache is filled by "
                             f"the first forward and read back by the recomputation; use it on causal or encoder "
                             f"models, or set trainer.gradient_checkpointing=false")
        super().checkpoint_activations()

    # -- saving --------------------------------------------------------------------------------
    def prefix_rows(self, stack: str) -> torch.Tensor:
        return self.prefixes[stack].flat()  # (p, n_layers * 2 * kv_heads * head_dim)

    def _key(self, name: str) -> str:
        return "prefix" if len(self.stacks) == 1 else f"{name}_prefix"

    def adapter_tensors(self):
        return {self._key(s.name): self.prefixes[s.name].flat().detach().float().contiguous() for s in self.stacks}

    def load_adapter_tensors(self, tensors):
        """Load collapsed prefixes: inference then uses them directly (frozen)."""
        for s in self.stacks:
            key = self._key(s.name)
            if key not in tensors:
                raise PtuneError(f"adapter has no tensor {key!r} (it has {sorted(tensors)}); it was trained "
                                 f"for another model kind or method")
            shape = tuple(tensors[key].shape)
            if shape != (self.num_virtual_tokens, s.width):
                want = (self.num_virtual_tokens, s.width)
                raise PtuneError(f"adapter {key} has shape {shape}, this model needs {want}; "
                                 f"set method.num_virtual_tokens to the adapter's length")
        for s in self.stacks:
            device = next(self.backbone.model.parameters()).device
            self.prefixes[s.name].set_directly(tensors[self._key(s.name)].to(device), trainable=False)
        self.projection = False

    def adapter_config(self):
        return dict(method=self.name, num_virtual_tokens=self.num_virtual_tokens, init=self.init,
                    stacks={s.name: dict(tensor=self._key(s.name), num_layers=s.n_layers, num_kv_heads=s.kv_heads,
                                         head_dim=s.head_dim) for s in self.stacks},
                    layout="(p, layers*2*kv_heads*head_dim), PEFT prompt_embeddings order")


@torch.no_grad()
def word_activations(backbone, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per stack, the flat (p, width) keys/values of the frozen LM reading the p token ids."""
    model = backbone.model
    training = model.training
    model.eval()  # the activations of the model as it is, without dropout
    device = next(model.parameters()).device
    ids = ids.view(1, -1).to(device)  # (1, p)
    ones = torch.ones_like(ids)
    try:
        if backbone.kind != "seq2seq":  # decoder-only and BERT fill a cache they are handed
            cache = kv.dynamic_cache(None, model.config)
            model.base_model(input_ids=ids, attention_mask=ones, use_cache=True, **{kv.cache_kwarg(model): cache})
            name = kv.stacks_of(backbone)[0].name
            return {name: kv.from_layers([(layer.keys, layer.values) for layer in cache.layers])}
        record: dict = {}
        encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=ones, **{kv.RECORD_KWARG: record})
        cache = kv.encoder_decoder_cache(None, None)
        model(encoder_outputs=encoder_outputs, attention_mask=ones, decoder_input_ids=ids, use_cache=True,
              **{kv.cache_kwarg(model): cache})
        return {"encoder": kv.from_layers([record[i] for i in sorted(record)]),
                "decoder": kv.from_layers([(l.keys, l.values) for l in cache.self_attention_cache.layers]),
                "cross": kv.from_layers([(l.keys, l.values) for l in cache.cross_attention_cache.layers])}
    finally:
        model.train(training)

"""Key/value prefixes in every attention layer: the plumbing shared by prefix-tuning and P-tuning v2.

A prefix of length p for one attention *stack* is one flat tensor (p, L * 2 * kv_heads * head_dim),
laid out like PEFT's `prompt_embeddings` ([layer 0 K, layer 0 V, layer 1 K, ...], each
kv_heads * head_dim wide). Stacks by backbone kind:

    causal  (GPT-2, Llama)  decoder   self-attention of every layer
    masked  (BERT)          encoder   self-attention of every layer
    seq2seq (T5, BART)      encoder   self-attention of every encoder layer
                            decoder   self-attention of every decoder layer
                            cross     decoder cross-attention of every decoder layer

How a prefix reaches the frozen model (transformers 5.x, nothing patched; the cache goes in under
the keyword the installed version names, `cache` or `past_key_values`: `cache_kwarg`):
- decoder-only and BERT self-attention: a `DynamicCache` holding the prefix, passed as the
  model's cache. BERT's encoder hands its cache to every layer (BertSelfAttention appends to it
  whether or not the model is a decoder), and its mask builder reads a 2D mask of p + seq columns;
- decoder self- and cross-attention: an `EncoderDecoderCache` whose self cache holds the decoder
  prefix and whose cross cache holds the cross prefix. EncoderDecoderCache marks every layer whose
  cross cache is non-empty as already computed (`is_updated`), so BartAttention / T5Attention
  would reuse the prefix alone and never look at the encoder; `encoder_decoder_cache` clears the
  flags, and the first decoder forward then appends the encoder's keys/values behind the prefix
  ([prefix; encoder], the cross mask extended by p ones in front) and sets them again, so later
  generation steps reuse the whole. Checked: a cross prefix equal to the projected keys/values of
  extra encoder states gives the logits of those states prepended to the encoder output
  (tests/test_prefix_seq2seq.py). Beam search reorders both caches (`reorder_cache`);
- encoder self-attention of an encoder-decoder: T5Stack drops past_key_values for its encoder
  and BartEncoder takes none, so no cache can carry it. The encoder's attention goes through a
  function registered with transformers' `AttentionInterface` (`install_encoder_prefix`), which
  wraps the configured implementation (sdpa or eager) and, only when the call carries the keyword
  `ptune_prefix` (an `EncoderPrefix`), puts the layer's prefix keys/values in front of the keys,
  p always-visible columns in front of the mask, and for T5 p columns in front of the relative
  position bias. Without the keyword it is the wrapped implementation unchanged (same numbers).
  The keyword reaches the attention through the encoder's **kwargs, as transformers passes
  attention kwargs. For BERT the same function gives exactly the cache route's numbers
  (tests/test_p_tuning_v2.py), which checks it against transformers' own prefix path.

T5's relative position bias for prefix keys: the decoder cache route numbers the prefix as the p
positions before the first token (T5Attention.compute_bias with past_seen_tokens = p), and the
encoder gets the same convention with T5's bidirectional buckets: prefix key j sits at j - p, so
its bias to query i is that of relative position j - p - i (`prefix_position_bias`). Bias between
real tokens is unchanged (it depends on differences only).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, DynamicCache, EncoderDecoderCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ptune.errors import PtuneError

PREFIX_KWARG = "ptune_prefix"  # attention kwarg carrying an EncoderPrefix
RECORD_KWARG = "ptune_record"  # attention kwarg: a dict that collects each layer's keys/values
WRAPPED = ("sdpa", "eager")


@dataclass(frozen=True)
class Stack:
    """One attention stack that gets a prefix: its name and the shape of its keys/values."""

    name: str  # decoder | encoder | cross
    n_layers: int
    kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Length of one row of the flat prefix: L * 2 * kv_heads * head_dim."""
        return self.n_layers * 2 * self.kv_heads * self.head_dim


def stacks_of(backbone) -> list[Stack]:
    """The stacks a prefix covers on this backbone (see the module docstring)."""
    d, config = backbone.dims, backbone.model.config
    if backbone.kind == "causal":
        return [Stack("decoder", d.n_layers, d.n_kv_heads, d.head_dim)]
    if backbone.kind in ("masked", "encoder"):
        return [Stack("encoder", d.n_layers, d.n_kv_heads, d.head_dim)]
    if backbone.kind == "seq2seq":
        # BART names its head counts per stack; T5 has one (num_heads) and a fixed d_kv.
        enc_heads = getattr(config, "encoder_attention_heads", None) or d.n_heads
        dec_heads = getattr(config, "decoder_attention_heads", None) or d.n_heads
        head_dim = getattr(config, "d_kv", None) or d.hidden // dec_heads
        enc_head_dim = getattr(config, "d_kv", None) or d.hidden // enc_heads
        return [Stack("encoder", d.n_encoder_layers, enc_heads, enc_head_dim),
                Stack("decoder", d.n_layers, dec_heads, head_dim),
                Stack("cross", d.n_layers, dec_heads, head_dim)]
    raise PtuneError(f"prefixes do not support model.kind={backbone.kind!r}; use a causal, masked or seq2seq model")


class PrefixParams(nn.Module):
    """The trainable prefix of one stack: P directly, or P = MLP(P') (Li & Liang §4.3).

    projection: P' is an Embedding(p, embed_dim) and the MLP Linear(embed_dim, mid_dim) - Tanh -
    Linear(mid_dim, width), as Li & Liang's `wte` + `control_trans` (and P-tuning v2's
    PrefixEncoder with prefix_projection); otherwise P is one (p, width) parameter drawn from
    N(0, 1), as nn.Embedding (PEFT and P-tuning v2 without projection). Either way `flat()` is P.
    """

    def __init__(self, num_virtual_tokens: int, width: int, projection: bool, embed_dim: int, mid_dim: int):
        super().__init__()
        p = num_virtual_tokens
        self.num_virtual_tokens, self.width, self.projection = p, width, projection
        if projection:
            self.embedding = nn.Embedding(p, embed_dim)  # P': (p, embed_dim)
            self.mlp = nn.Sequential(nn.Linear(embed_dim, mid_dim), nn.Tanh(), nn.Linear(mid_dim, width))
        else:
            self.prefix = nn.Parameter(torch.randn(p, width))  # P: (p, width)

    def flat(self) -> torch.Tensor:
        """(p, width)."""
        return self.mlp(self.embedding.weight) if self.projection else self.prefix

    def set_directly(self, prefix: torch.Tensor, trainable: bool) -> None:
        """Replace the parameters by P itself (a loaded adapter, or init from words without projection)."""
        if self.projection:
            del self.embedding, self.mlp
            self.projection = False
        self.prefix = nn.Parameter(prefix.detach().float().clone(), requires_grad=trainable)

    def fit_mlp(self, target: torch.Tensor, steps: int, lr: float) -> tuple[float, float]:
        """Train the MLP alone so that MLP(P') regresses onto target (p, width) by MSE, with Adam.

        Li & Liang's code for initialising a reparameterized prefix from real words
        (`lowdata_init_train2/3`: Adam over `control_trans` only, lr 1e-4, 500 steps, MSELoss).
        Returns the mean squared error before and after.
        """
        optimizer = torch.optim.Adam(self.mlp.parameters(), lr=lr)
        with torch.enable_grad():
            for step in range(steps + 1):
                loss = F.mse_loss(self.flat(), target)
                if step == 0:
                    first = loss.item()
                if step == steps:
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        for param in self.parameters():  # the embedding got gradients too (not stepped): leave none behind
            param.grad = None
        return first, loss.item()


def to_layers(flat: torch.Tensor, stack: Stack, batch: int, dtype: torch.dtype, dropout: float = 0.0,
              training: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (batch, kv_heads, p, head_dim), from the flat (p, width).

    Dropout (P-tuning v2's hidden_dropout_prob on past_key_values, Li & Liang's prefix_dropout)
    draws an independent mask per example, as both codes apply it after expanding to the batch.
    """
    p = flat.shape[0]
    kv = flat.to(dtype).view(p, 2 * stack.n_layers, stack.kv_heads, stack.head_dim).permute(1, 2, 0, 3)
    kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, batch, kv_heads, p, head_dim)
    if dropout and training:
        kv = F.dropout(kv, dropout, training=True)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(stack.n_layers)]


def from_layers(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Inverse of to_layers for batch 1: per layer (1, kv_heads, p, head_dim) pairs -> flat (p, width)."""
    kv = torch.stack([t[0] for pair in layers for t in pair])  # (2L, kv_heads, p, head_dim)
    return kv.permute(2, 0, 1, 3).reshape(kv.shape[2], -1).float()


def cache_kwarg(model) -> str:
    """The keyword that hands this model a cache: `cache` where the installed transformers has it
    (5.24 deprecates `past_key_values` for forward and generate, to be removed in 5.40 and 6.0),
    `past_key_values` in the 5.x releases before it. Read off the base model: heads such as
    BertForMaskedLM name neither and pass the keyword on to it."""
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


def dynamic_cache(layers, config=None, read_only: bool = False) -> DynamicCache:
    """A cache pre-filled with the prefix of every layer (decoder-only and BERT self-attention).

    read_only: each layer answers `update` with [prefix; new keys] without storing them, so a layer run
    twice (activation checkpointing recomputes every layer in the backward pass) sees the prefix both
    times. transformers' checkpointed layers drop a cache altogether (PEFT issue #869: prefix-tuning
    refuses gradient checkpointing); a one-forward training step needs no stored keys, so ptune keeps
    the cache and marks the layers to keep it (`checkpoint_activations`)."""
    cache = DynamicCache(ddp_cache_data=layers, config=config)
    if read_only:
        for layer in cache.layers:
            layer.__class__ = _PrefixLayer
    return cache


class _PrefixLayer(DynamicLayer):
    """A prefix cache layer that never grows (dynamic_cache(read_only=True))."""

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def checkpoint_activations(model) -> None:
    """Activation checkpointing of every layer of a transformers model (non-reentrant: the frozen layers'
    inputs need not require grad, and tensors that reach a layer by keyword, such as prefix caches, get
    their gradients); its layers keep a read-only prefix cache (dynamic_cache(read_only=True))."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PtuneError(f"trainer.gradient_checkpointing=true: {type(model).__name__} has no activation "
                         f"checkpointing in transformers; set trainer.gradient_checkpointing=false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True  # the cache it gets is read-only (see dynamic_cache)
        elif hasattr(module, "gradient_checkpointing"):
            # the stack around the layers (GPT2Model, BertEncoder, ...): some withhold the cache from their
            # layers while the flag is on (GPT-2); the layers checkpoint by their own flag
            module.gradient_checkpointing = False


def encoder_decoder_cache(self_layers, cross_layers) -> EncoderDecoderCache:
    """Decoder self- and cross-attention prefixes; the encoder's keys/values follow on the first forward.

    The caches get no config: DynamicCache(config=...) sizes itself by the config's (encoder)
    layer count, while these hold exactly the decoder's layers.
    """
    cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=self_layers), DynamicCache(ddp_cache_data=cross_layers))
    # A non-empty cross cache is taken for the finished encoder projection; it is only the prefix.
    for layer in cache.is_updated:
        cache.is_updated[layer] = False
    return cache


# -- encoder self-attention of encoder-decoders: an AttentionInterface function -------------------
@dataclass
class EncoderPrefix:
    """What one encoder forward puts in front of every layer's keys (the `ptune_prefix` kwarg)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (batch, heads, p, head_dim) each
    position_bias: torch.Tensor | None = None  # T5: (1, heads, seq, p) bias of the prefix columns


def _prefixed_attention(wrapped: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        prefix: EncoderPrefix | None = kwargs.pop(PREFIX_KWARG, None)
        record: dict | None = kwargs.pop(RECORD_KWARG, None)
        if record is not None:
            record[module.layer_idx] = (key, value)
        if prefix is not None:
            pk, pv = prefix.layers[module.layer_idx]  # (batch, heads, p, head_dim)
            p = pk.shape[2]
            key = torch.cat([pk.to(key.dtype), key], dim=2)  # (batch, heads, p + seq, head_dim)
            value = torch.cat([pv.to(value.dtype), value], dim=2)
            if attention_mask is not None:  # (batch, 1, seq, seq): bool (sdpa) or additive float (eager)
                visible = torch.ones((), dtype=torch.bool) if attention_mask.dtype == torch.bool \
                    else torch.zeros((), dtype=attention_mask.dtype)
                visible = visible.to(attention_mask.device).expand(*attention_mask.shape[:-1], p)
                attention_mask = torch.cat([visible, attention_mask], dim=-1)  # (batch, 1, seq, p + seq)
            bias = kwargs.get("position_bias")
            if bias is not None:  # T5: (1 or batch, heads, seq, seq)
                prefix_bias = prefix.position_bias.to(bias.dtype).expand(bias.shape[0], -1, -1, -1)
                kwargs["position_bias"] = torch.cat([prefix_bias, bias], dim=-1)
        # "eager" is no registered function: each model file has its own (T5's adds position_bias)
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        return ALL_ATTENTION_FUNCTIONS.get_interface(wrapped, eager)(module, query, key, value, attention_mask, **kwargs)

    return attention


for _name in WRAPPED:
    AttentionInterface.register(f"ptune_prefix_{_name}", _prefixed_attention(_name))
    AttentionMaskInterface.register(f"ptune_prefix_{_name}", ALL_MASK_ATTENTION_FUNCTIONS[_name])


def install_encoder_prefix(model) -> None:
    """Route the encoder's attention through the prefix-aware function (idempotent).

    `set_attn_implementation` on the encoder: T5's encoder has its own config, BART's shares one
    with its decoder, whose attention then passes through the same function unchanged.
    """
    encoder = model.get_encoder()
    current = encoder.config._attn_implementation
    if current.startswith("ptune_prefix_"):
        return
    if current not in WRAPPED:
        raise PtuneError(f"encoder prefixes wrap the sdpa or eager attention, and this model runs {current!r}; "
                         f"use a model whose attention runs as sdpa or eager (transformers' default for T5 and BART)")
    encoder.set_attn_implementation(f"ptune_prefix_{current}")


def relative_bias_module(encoder) -> nn.Module | None:
    """The encoder's shared relative-position-bias attention (T5's first layer), None for other encoders."""
    for module in encoder.modules():
        if getattr(module, "has_relative_attention_bias", False) and hasattr(module, "compute_bias"):
            return module
    return None


def prefix_position_bias(bias_module: nn.Module, seq: int, p: int, device) -> torch.Tensor:
    """(1, heads, seq, p): T5's bias from real query i to prefix key j, the prefix at positions -p..-1."""
    # compute_bias numbers queries from past_seen_tokens: queries at p..p+seq-1, keys at 0..p+seq-1
    full = bias_module.compute_bias(seq, p + seq, device=device, past_seen_tokens=p)  # (1, heads, seq, p + seq)
    return full[..., :p]

"""Prefix-tuning — Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation".

Trainable key/value prefixes of length p in every attention layer of a frozen LM. During training
the prefix is reparameterized (paper §4.3): P = MLP(P'), with P' a (p, d) embedding and the MLP
Linear(d, mid_dim) - Tanh - Linear(mid_dim, L * 2 * kv_heads * head_dim), mid_dim 512. After
training only P is needed: the adapter stores the collapsed prefix, not the MLP.

Shapes: the flat prefix is (p, L * 2 * kv_heads * head_dim), laid out like PEFT's
`prompt_embeddings` ([layer 0 K, layer 0 V, layer 1 K, ...]) so that an adapter converts to PEFT by
renaming. Per layer the backbone receives keys and values of shape (batch, kv_heads, p, head_dim)
through a `transformers.DynamicCache` built from them (the installed library's own cache object,
no tuple caches, no patched attention).

Differences from PEFT's PrefixTuning:
- positions: real tokens are numbered from p onwards from the attention mask, so left- and
  right-padded rows give the same logits in training and in generate();
- the adapter holds the collapsed prefix even when training used the MLP (PEFT saves the MLP's
  output too, but keeps the MLP in the training state the same way we do in checkpoints/);
- generation prefills nothing by hand: the prefix is in the cache and `p` placeholder ids stand
  in front of the prompt, so transformers' generate() numbers the cache correctly for greedy and
  beam search alike.
Encoder-decoder backbones (encoder self-attention, decoder self- and cross-attention prefixes, as
in the paper) are not wired in yet: they raise a clear error.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from ptune.errors import PtuneError
from ptune.methods.base import Method


class Prefix(Method):
    name = "prefix"

    def __init__(self, backbone, num_virtual_tokens: int = 10, projection: bool = True, mid_dim: int = 512,
                 embed_dim: int | None = None, init: str = "random", **_):
        super().__init__(backbone)
        d = self.dims
        if d.is_encoder_decoder:
            raise PtuneError("method=prefix on encoder-decoder models is not available yet; use a decoder-only model")
        if init != "random":
            raise PtuneError(f"method.init={init!r} is not available for prefix yet; use method.init=random")
        self.p = num_virtual_tokens
        self.kv_dim = d.n_layers * 2 * d.n_kv_heads * d.head_dim  # one row of the flat prefix
        self.projection = projection
        self.mid_dim, self.embed_dim = mid_dim, embed_dim or d.hidden
        if projection:
            self.embedding = nn.Embedding(self.p, self.embed_dim)  # P': (p, embed_dim)
            self.mlp = nn.Sequential(
                nn.Linear(self.embed_dim, mid_dim), nn.Tanh(), nn.Linear(mid_dim, self.kv_dim)
            )
        else:
            self.prefix = nn.Parameter(torch.randn(self.p, self.kv_dim))  # P directly (PEFT's init)

    def flat_prefix(self) -> torch.Tensor:
        """(p, L * 2 * kv_heads * head_dim)."""
        if self.projection:
            return self.mlp(self.embedding.weight)
        return self.prefix

    def cache(self, batch_size: int) -> DynamicCache:
        """A fresh cache holding the prefix for every layer; (batch, kv_heads, p, head_dim) each."""
        d = self.dims
        flat = self.flat_prefix()
        model_dtype = next(self.backbone.model.parameters()).dtype
        kv = flat.to(model_dtype).view(self.p, d.n_layers * 2, d.n_kv_heads, d.head_dim).permute(1, 2, 0, 3)
        layers = [
            (kv[2 * i].unsqueeze(0).expand(batch_size, -1, -1, -1), kv[2 * i + 1].unsqueeze(0).expand(batch_size, -1, -1, -1))
            for i in range(d.n_layers)
        ]
        return DynamicCache(ddp_cache_data=layers, config=self.backbone.model.config)

    def _mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        ones = attention_mask.new_ones(attention_mask.shape[0], self.p)
        return torch.cat([ones, attention_mask], dim=1)  # (batch, p + seq)

    def model_inputs(self, input_ids, attention_mask):
        inputs = dict(
            input_ids=input_ids,
            attention_mask=self._mask(attention_mask),
            past_key_values=self.cache(input_ids.shape[0]),
            use_cache=False,
        )
        pos = self._position_ids(attention_mask, self.p)
        if pos is not None:
            inputs["position_ids"] = pos
        return inputs

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **gen_kwargs):
        # p placeholder ids stand for the prefix already in the cache: generate() then starts its
        # cache positions at p and feeds only the real prompt. Beams need the cache per beam.
        n = input_ids.shape[0] * gen_kwargs.get("num_beams", 1)
        placeholder = input_ids.new_full((input_ids.shape[0], self.p), self.backbone.tokenizer.pad_token_id)
        out = self.backbone.model.generate(
            input_ids=torch.cat([placeholder, input_ids], dim=1),
            attention_mask=self._mask(attention_mask),
            past_key_values=self.cache(n),
            **gen_kwargs,
        )
        return out[:, self.p + input_ids.shape[1]:]

    # -- saving --------------------------------------------------------------------------------
    def adapter_tensors(self):
        return {"prefix": self.flat_prefix().detach().float().contiguous()}

    def load_adapter_tensors(self, tensors):
        """Load a collapsed prefix: inference (and PEFT-style training) then uses it directly."""
        prefix = tensors["prefix"]
        if tuple(prefix.shape) != (self.p, self.kv_dim):
            raise PtuneError(f"adapter prefix has shape {tuple(prefix.shape)}, this model needs {(self.p, self.kv_dim)}")
        if self.projection:
            del self.embedding, self.mlp
            self.projection = False
        self.prefix = nn.Parameter(prefix.clone(), requires_grad=False)

    def adapter_config(self):
        d = self.dims
        return dict(method=self.name, num_virtual_tokens=self.p, num_layers=d.n_layers, num_kv_heads=d.n_kv_heads,
                    head_dim=d.head_dim, layout="(p, layers*2*kv_heads*head_dim), PEFT prompt_embeddings order")

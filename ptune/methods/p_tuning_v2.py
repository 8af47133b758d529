"""P-tuning v2 — Liu, Ji, Fu, Tam, Du, Yang & Tang 2022, "P-Tuning v2: Prompt Tuning Can Be
Comparable to Fine-tuning Universally Across Scales and Tasks" (ACL 2022).

Deep prompt tuning for NLU: continuous prompts in every layer of a frozen LM, as key/value
prefixes of every attention (§3.2; the official code, THUDM/P-tuning-v2, passes them to BertModel
as past_key_values), read out by a randomly initialised linear classification head on the
tokens, as in BERT, instead of a verbalizer (§3.3; ptune: `task.head=linear`, [CLS] on BERT, the
last token on decoder-only models, the decoder's first state on encoder-decoders). The K/V
plumbing is prefix-tuning's (`Prefix`, `kv.py`), so every backbone works, and the lm head too.
What differs from `method=prefix` is the paper's recipe, in the defaults:
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
Stored and trainable counts are prefix-tuning's (see prefix.py): without projection
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
decoder's self-attention only (see prefix.py).
"""

from __future__ import annotations

from ptune.methods.prefix import Prefix


class PTuningV2(Prefix):
    name = "p-tuning-v2"

    def __init__(self, backbone, num_virtual_tokens: int = 20, projection: bool = False, mid_dim: int = 512,
                 embed_dim: int | None = None, init: str = "random", init_text: str | None = None,
                 dropout: float = 0.1, **_):
        super().__init__(backbone, num_virtual_tokens=num_virtual_tokens, projection=projection, mid_dim=mid_dim,
                         embed_dim=embed_dim, init=init, init_text=init_text, dropout=dropout)

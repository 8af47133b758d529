"""Prompt tuning — Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning".

p trainable "soft token" embeddings P, (p, hidden), are prepended to the input embeddings of a
frozen LM; nothing else changes. The model sees inputs_embeds = [P; embed(x)], (batch, p + seq,
hidden), with the attention mask extended by p ones. Trained and stored: exactly p * hidden numbers,
the adapter tensor `prompt` of shape (p, hidden) -- the same layout as PEFT's `prompt_embeddings`
for a decoder-only model (num_transformer_submodules = 1), so export to PEFT is a rename.

Initialisation (`init`, paper §3.2 and Fig. 3b):
- `random`: uniform in [-0.5, 0.5], as in the paper (PEFT's RANDOM is nn.Embedding's N(0, 1));
- `vocab`: each row is the embedding of a token drawn (with replacement, from the run's torch RNG)
  from the 5,000 most common tokens. The paper reads "most common" off T5's SentencePiece
  vocabulary, which is ordered by likelihood. We take the first 5,000 ids that are not special or
  added tokens. For SentencePiece vocabularies that is the paper's rule; for byte-level BPE (GPT-2,
  SmolLM2) ids come as the byte alphabet followed by the merges in merge order (checked for the
  SmolLM2 tokenizer: merge results have strictly increasing ids, starting at 252), and each merge
  is the most frequent pair left when it was learned, so low ids are frequent tokens. The
  alphabet (235 single bytes for SmolLM2, about 5% of the pool) includes a few rare bytes: a
  known imperfection of the proxy. PEFT's SAMPLE_VOCAB samples from the whole vocabulary;
- `text`: the embeddings of `init_text`'s tokens (no special tokens added), repeated or cut to
  length p (PEFT's TEXT does the same; it tokenizes with special tokens, which adds none for
  GPT-2/SmolLM2 tokenizers);
- `labels`: the paper's best init (class-label embeddings) needs a classification task with a
  verbalizer; none exists yet, so it raises.

Positions: the virtual tokens take positions 0..p-1 and real tokens count on from p, skipping
pads (`_position_ids`), so left- and right-padded rows give the same logits in training and in
generate(). PEFT drops position_ids for prompt tuning and lets the model number the whole
[P; x] sequence 0..p+seq-1: identical for unpadded input, but in PEFT a left-padded row's tokens
are shifted by its padding.

Differences from the paper: the paper trains T5 (encoder-decoder) with Adafactor at lr 0.3 for
30k steps; here the trainer is AdamW (set trainer.lr) and only decoder-only backbones are wired.

Generation goes through transformers' generate(inputs_embeds=...): for decoder-only models it
returns only the new tokens, and greedy and beam search both work (tests/test_prompt.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ptune.errors import PtuneError
from ptune.methods.base import Method

INITS = ("vocab", "text", "random", "labels")
N_COMMON = 5000  # the paper's "5,000 most common tokens"


class Prompt(Method):
    name = "prompt"

    def __init__(self, backbone, num_virtual_tokens: int = 20, init: str = "vocab", init_text: str | None = None, **_):
        super().__init__(backbone)
        if self.dims.is_encoder_decoder or backbone.kind != "causal":
            raise PtuneError(f"method=prompt on {backbone.kind} models is not available yet; use a decoder-only "
                             f"(model.kind=causal) model such as model=smollm2-135m")
        if init not in INITS:
            raise PtuneError(f"method.init={init!r} is not one of {', '.join(INITS)}; use method.init=vocab")
        self.p = self.n_prepended = num_virtual_tokens
        self.init = init
        self.prompt = nn.Parameter(self._initial_prompt(init, init_text))  # (p, hidden), float32

    # -- initialisation ----------------------------------------------------------------------
    def _initial_prompt(self, init: str, init_text: str | None) -> torch.Tensor:
        """(p, hidden) float32 starting values; random draws come from the global torch RNG."""
        p, hidden = self.p, self.dims.hidden
        weight = self.backbone.model.get_input_embeddings().weight  # (vocab, hidden)
        if init == "random":
            return torch.empty(p, hidden).uniform_(-0.5, 0.5)
        if init == "labels":
            raise PtuneError("method.init=labels needs a classification task with a verbalizer, and none exists yet; "
                             "use method.init=vocab, text or random")
        if init == "vocab":
            pool = common_token_ids(self.backbone.tokenizer, weight.shape[0])
            ids = pool[torch.randint(0, len(pool), (p,))]
        else:
            ids = text_token_ids(self.backbone.tokenizer, init_text, p)
        return weight.detach()[ids.to(weight.device)].float().cpu().clone()

    # -- forward -------------------------------------------------------------------------------
    def _mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        ones = attention_mask.new_ones(attention_mask.shape[0], self.p)
        return torch.cat([ones, attention_mask], dim=1)  # (batch, p + seq)

    def model_inputs(self, input_ids, attention_mask):
        embeds = self.backbone.model.get_input_embeddings()(input_ids)  # (batch, seq, hidden)
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)  # (batch, p, hidden)
        inputs = dict(inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=self._mask(attention_mask),
                      use_cache=False)
        real = self._position_ids(attention_mask, self.p)  # (batch, seq): p, p+1, ... skipping pads
        if real is not None:
            virtual = torch.arange(self.p, device=real.device).expand(real.shape[0], -1)  # (batch, p)
            inputs["position_ids"] = torch.cat([virtual, real], dim=1)  # (batch, p + seq)
        return inputs

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **gen_kwargs):
        # With inputs_embeds and no input_ids, generate() returns only the new tokens; it extends
        # the position ids by one per step and copies them per beam.
        inputs = self.model_inputs(input_ids, attention_mask)
        inputs.pop("use_cache")
        return self.backbone.model.generate(**inputs, **gen_kwargs)

    # -- saving --------------------------------------------------------------------------------
    def adapter_tensors(self):
        return {"prompt": self.prompt.detach().float().contiguous()}  # (p, hidden)

    def load_adapter_tensors(self, tensors):
        """Load a trained prompt for inference (it is then frozen, like a loaded prefix)."""
        prompt = tensors["prompt"]
        if tuple(prompt.shape) != (self.p, self.dims.hidden):
            raise PtuneError(f"adapter prompt has shape {tuple(prompt.shape)}, this model needs {(self.p, self.dims.hidden)}; "
                             f"set method.num_virtual_tokens to the adapter's length")
        self.prompt = nn.Parameter(prompt.to(self.prompt.device, self.prompt.dtype).clone(), requires_grad=False)

    def adapter_config(self):
        return dict(method=self.name, num_virtual_tokens=self.p, token_dim=self.dims.hidden, init=self.init,
                    layout="(p, hidden), PEFT prompt_embeddings (rename prompt -> prompt_embeddings)")


def common_token_ids(tokenizer, n_rows: int, n: int = N_COMMON) -> torch.Tensor:
    """The first n token ids that are neither special nor added tokens (the 'most common' proxy)."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    ids = [i for i in range(min(len(tokenizer), n_rows)) if i not in special][:n]
    return torch.tensor(ids, dtype=torch.long)


def text_token_ids(tokenizer, text: str | None, p: int) -> torch.Tensor:
    """ids of `text` (no special tokens), repeated or cut to exactly p."""
    ids = tokenizer(text, add_special_tokens=False).input_ids if text else []
    if not ids:
        raise PtuneError(f"method.init=text needs a non-empty method.init_text (got {text!r}); "
                         f"set method.init_text='...' or use method.init=vocab")
    return torch.tensor((ids * (p // len(ids) + 1))[:p], dtype=torch.long)

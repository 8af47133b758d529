"""Prompt tuning — Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning".

p trainable "soft token" embeddings P, (p, hidden), are prepended to the input embeddings of a
frozen LM; nothing else changes. The model sees inputs_embeds = [P; embed(x)], (batch, p + seq,
hidden), with the attention mask extended by p ones. Trained and stored: exactly p * hidden numbers,
the adapter tensor `prompt` of shape (p, hidden), on every backbone.

Where the prompt goes, per backbone kind:
- causal (GPT-2, Llama): in front of the input; the LM continues after it.
- seq2seq (T5, BART; the paper trains T5): in front of the ENCODER input only; the extended mask
  is the encoder's self-attention mask and the decoder's cross-attention mask; the decoder is
  untouched (paper §2: "prepended to the embedded input" of the encoder). PEFT allocates a second
  (p, hidden) block for the decoder (num_transformer_submodules=2 for SEQ_2_SEQ_LM) but its prompt
  tuning forward and generate() use only the first block: the second is saved and never used.
  Same computation as ptune; export = our tensor as the first p rows (or set PEFT's
  num_transformer_submodules=1, then it is a rename).
- masked / encoder (BERT): in front of [CLS], as PEFT and P-tuning v2's prompt baseline do; a
  linear head pools [CLS] at position p (the first real position, `n_prepended`). PEFT's SEQ_CLS
  wrapper pools position 0 instead, a virtual token. No generation.

Initialisation (`init`, paper §3.2 and Fig. 3b):
- `random`: uniform in [-0.5, 0.5], as in the paper (PEFT's RANDOM is nn.Embedding's N(0, 1));
- `vocab`: each row is the embedding of a token drawn without replacement (as the authors' code,
  google-research/prompt-tuning `from_sample_of_embeddings`; with replacement only if p > 5,000)
  from the 5,000 most common tokens, with the run's torch RNG. The paper reads "most common" off
  T5's SentencePiece vocabulary, which is ordered by likelihood. We take the first 5,000 ids that
  are not special or added tokens. For SentencePiece vocabularies that is the paper's rule; for
  byte-level BPE (GPT-2, SmolLM2) ids come as the byte alphabet followed by the merges in merge
  order (checked for the SmolLM2 tokenizer: merge results have strictly increasing ids, starting at
  252), and each merge is the most frequent pair left when it was learned, so low ids are frequent
  tokens. The alphabet (235 single bytes for SmolLM2, about 5% of the pool) includes a few rare
  bytes: a known imperfection of the proxy. BERT's WordPiece vocabulary holds 994 `[unused*]`
  slots (never trained: skipped too), then 997 single characters, then word pieces in frequency
  order ("the" is 1996): the pool is those characters and the ~4,000 most frequent words. PEFT's
  SAMPLE_VOCAB samples the whole vocabulary;
- `text`: the embeddings of `init_text`'s tokens (no special tokens added), repeated or cut to
  length p (PEFT's TEXT does the same; it tokenizes with special tokens, which adds none for
  GPT-2/SmolLM2 tokenizers);
- `labels` (the paper's best): row i is the embedding of class i's label string (`label_words`,
  the task's verbalizer words as the verbalizer tokenizes them, after the template's whitespace
  before {mask}: " terrible", so a byte-level BPE embeds the very pieces the verbalizer scores;
  passed in by ptune.build from `task.init_label_words`), the mean of its token embeddings when it has
  several tokens; the remaining rows are sampled as for `vocab`; labels beyond p are skipped.
  Paper §3.2: "When a class label is multi-token, we average the token embeddings ... we fall
  back to our sampled vocab strategy to fill in the prompt"; the authors' `from_embedded_list`
  puts label i at row i. A class given several label words averages all their tokens (an
  extension: the paper has one string per class).
Rows are read through the input embedding module, so a scaled embedding (BART's
`scale_embedding`) seeds the prompt in the space the model reads.

Positions: the virtual tokens take positions 0..p-1 and real tokens count on from p, skipping
pads (`_position_ids`), so left- and right-padded rows give the same logits in training and in
generate(). PEFT drops position_ids for prompt tuning and lets the model number the whole
[P; x] sequence 0..p+seq-1: identical for unpadded input, but in PEFT a left-padded row's tokens
are shifted by its padding. Encoder-decoders take no position ids: their encoder rows are
reordered real-tokens-first (`real_tokens_first`), which gives BART's learned absolute positions
the same numbering (and T5's relative ones never depended on padding).

Differences from the paper: the paper trains T5 with Adafactor at lr 0.3 for 30k steps; here the
trainer is AdamW (set trainer.lr).

Generation goes through transformers' generate(inputs_embeds=...), greedy and beam search alike
(tests/test_prompt.py, tests/test_prompt_seq2seq_masked.py). Decoder-only models then return only
the new tokens; encoder-decoders return the decoder's start token first, which is dropped.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ptune.errors import PtuneError
from ptune.methods.base import Method, real_tokens_first

INITS = ("vocab", "text", "random", "labels")
KINDS = ("causal", "seq2seq", "masked", "encoder")
N_COMMON = 5000  # the paper's "5,000 most common tokens"
UNUSED = re.compile(r"\[unused\d+\]")  # BERT's reserved vocabulary slots, never trained


class Prompt(Method):
    name = "prompt"
    acts_on = "input"
    peft_type = "PROMPT_TUNING"

    def __init__(self, backbone, *, num_virtual_tokens: int, init: str, init_text: str | None,
                 label_words: list | None = None, **_):
        super().__init__(backbone)
        if backbone.kind not in KINDS:
            raise PtuneError(f"method=prompt does not support model.kind={backbone.kind!r}; use one of {', '.join(KINDS)}")
        if init not in INITS:
            raise PtuneError(f"method.init={init!r} is not one of {', '.join(INITS)}; use method.init=vocab")
        self.num_virtual_tokens = self.n_prepended = num_virtual_tokens
        self.init = init
        self.prompt = nn.Parameter(self._initial_prompt(init, init_text, label_words))  # (p, hidden), float32

    # -- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def _initial_prompt(self, init: str, init_text: str | None, label_words) -> torch.Tensor:
        """(p, hidden) float32 starting values; random draws come from the global torch RNG."""
        p, hidden = self.num_virtual_tokens, self.dims.hidden
        table = self.backbone.model.get_input_embeddings()
        device = table.weight.device
        tok = self.backbone.tokenizer
        if init == "random":
            return torch.empty(p, hidden).uniform_(-0.5, 0.5)
        if init == "text":
            return table(text_token_ids(tok, init_text, p).to(device)).float().cpu().clone()
        if init == "labels":
            label_ids = label_token_ids(tok, label_words)  # checked before the RNG is drawn
        pool = common_token_ids(tok, table.weight.shape[0])
        draw = torch.randperm(len(pool))[:p] if p <= len(pool) else torch.randint(0, len(pool), (p,))
        prompt = table(pool[draw].to(device)).float().cpu().clone()  # (p, hidden)
        if init == "labels":
            for i, ids in enumerate(label_ids[:p]):
                prompt[i] = table(ids.to(device)).float().mean(0).cpu()  # multi-token label: the mean
        return prompt

    # -- forward -------------------------------------------------------------------------------
    def _mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        ones = attention_mask.new_ones(attention_mask.shape[0], self.num_virtual_tokens)
        return torch.cat([ones, attention_mask], dim=1)  # (batch, p + seq)

    def model_inputs(self, input_ids, attention_mask):
        """Backbone kwargs; input_ids, attention_mask: (batch, seq). Encoder-decoders: the encoder's
        inputs (the mask also serves cross-attention), rows reordered real-tokens-first."""
        if self.dims.is_encoder_decoder:
            attention_mask, input_ids = real_tokens_first(attention_mask, input_ids)
        embeds = self.backbone.model.get_input_embeddings()(input_ids)  # (batch, seq, hidden)
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)  # (batch, p, hidden)
        inputs = dict(inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=self._mask(attention_mask),
                      use_cache=False)
        real = self._position_ids(attention_mask, self.num_virtual_tokens)  # (batch, seq): p, p+1, ... skipping pads
        if real is not None:
            virtual = torch.arange(self.num_virtual_tokens, device=real.device)
            virtual = virtual.expand(real.shape[0], -1)  # (batch, p)
            inputs["position_ids"] = torch.cat([virtual, real], dim=1)  # (batch, p + seq)
        return inputs

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **gen_kwargs):
        """New tokens only, (batch * num_return_sequences, new_len)."""
        if self.backbone.kind not in ("causal", "seq2seq"):
            raise PtuneError(f"model {self.backbone.name} ({self.backbone.kind}) does not generate; use a "
                             f"classification task, or a causal or seq2seq model for generation")
        # Decoder-only: with inputs_embeds and no input_ids, generate() returns only the new tokens;
        # it extends the position ids by one per step and copies them per beam. Encoder-decoder:
        # the encoder runs once on inputs_embeds, and the output starts with the decoder start token.
        inputs = self.model_inputs(input_ids, attention_mask)
        inputs.pop("use_cache")
        out = self.backbone.model.generate(**inputs, **gen_kwargs)
        return out[:, 1:] if self.dims.is_encoder_decoder else out

    # -- saving --------------------------------------------------------------------------------
    def soft_prompt(self) -> torch.Tensor:
        return self.prompt  # (p, hidden) float32

    def adapter_tensors(self):
        return {"prompt": self.prompt.detach().float().contiguous()}  # (p, hidden)

    def load_adapter_tensors(self, tensors):
        """Load a trained prompt for inference (it is then frozen, like a loaded prefix)."""
        prompt = tensors["prompt"]
        if tuple(prompt.shape) != (self.num_virtual_tokens, self.dims.hidden):
            want = (self.num_virtual_tokens, self.dims.hidden)
            raise PtuneError(f"adapter prompt has shape {tuple(prompt.shape)}, this model needs {want}; "
                             f"set method.num_virtual_tokens to the adapter's length")
        self.prompt = nn.Parameter(prompt.to(self.prompt.device, self.prompt.dtype).clone(), requires_grad=False)

    def adapter_config(self):
        where = "encoder input" if self.dims.is_encoder_decoder else "input"
        peft = ("PEFT prompt_embeddings with num_transformer_submodules=1 (rename prompt -> prompt_embeddings; "
                "PEFT's default 2 for seq2seq adds p unused rows after ours)" if self.dims.is_encoder_decoder
                else "PEFT prompt_embeddings (rename prompt -> prompt_embeddings)")
        return dict(method=self.name, num_virtual_tokens=self.num_virtual_tokens, token_dim=self.dims.hidden,
                    init=self.init,
                    layout=f"(p, hidden), prepended to the {where}; {peft}")


def common_token_ids(tokenizer, n_rows: int, n: int = N_COMMON) -> torch.Tensor:
    """The first n token ids that are neither special, added nor unused slots (the 'most common' proxy)."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    candidates = [i for i in range(min(len(tokenizer), n_rows)) if i not in special]
    names = tokenizer.convert_ids_to_tokens(candidates[:n + 2000])  # room for BERT's 994 [unused*] slots
    ids = [i for i, name in zip(candidates, names) if not UNUSED.fullmatch(name)][:n]
    return torch.tensor(ids, dtype=torch.long)


def text_token_ids(tokenizer, text: str | None, p: int) -> torch.Tensor:
    """ids of `text` (no special tokens), repeated or cut to exactly p."""
    ids = tokenizer(text, add_special_tokens=False).input_ids if text else []
    if not ids:
        raise PtuneError(f"method.init=text needs a non-empty method.init_text (got {text!r}); "
                         f"set method.init_text='...' or use method.init=vocab")
    return torch.tensor((ids * (p // len(ids) + 1))[:p], dtype=torch.long)


def label_token_ids(tokenizer, label_words) -> list[torch.Tensor]:
    """One id tensor per class: the tokens of its label string(s), no special tokens."""
    if not label_words:
        raise PtuneError("method.init=labels needs the label words of a classification task (task.label_words()), "
                         "and this task has none; use method.init=vocab, text or random")
    out = []
    for words in label_words:
        words = [words] if isinstance(words, str) else list(words)
        ids = [i for w in words for i in tokenizer(w, add_special_tokens=False).input_ids]
        if not ids:
            raise PtuneError(f"method.init=labels: label {words!r} has no tokens; give every class a non-empty label word")
        out.append(torch.tensor(ids, dtype=torch.long))
    return out

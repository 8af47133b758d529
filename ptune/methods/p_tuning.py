"""P-tuning — Liu, Zheng, Du, Ding, Qian, Yang & Tang 2021, "GPT Understands, Too" (P-tuning v1).

p continuous prompt vectors h_0..h_{p-1}, (p, hidden), are produced by a prompt encoder from a
trainable (p, hidden) embedding and put into the input embeddings of a frozen LM at "soft"
positions of a template (paper §3: prompts anywhere, e.g. [P0..Pi] x [Pi+1..Pm] y). After training
only the encoder's output is needed: the adapter stores `prompt`, (p, hidden); the encoder is
dropped (like prefix.py's collapsed prefix).

Prompt encoder (`encoder`), submodules named as PEFT's PromptEncoder (`embedding`, `lstm_head`,
`mlp_head`) so that a checkpoint's tensors load into PEFT's `prompt_encoder` by name:
- `lstm` (the paper, §3.2, and its LAMA code, THUDM/P-tuning LAMA/p_tuning/prompt_encoder.py):
  2-layer bidirectional LSTM with E/2 units per direction (output width E), then Linear(E, E) -
  ReLU - Linear(E, hidden). E = `encoder_hidden_size`, default hidden: exactly the paper's
  LSTM(hidden, hidden // 2) + Linear(hidden, hidden) ReLU Linear(hidden, hidden). PEFT's LSTM
  encoder is the same network with its `encoder_hidden_size` = our E / 2 (PEFT counts units per
  direction; PEFT's default, token_dim per direction, is twice the paper's width). The paper's
  FewGLUE code (PT-Fewshot/pet/wrapper.py) uses yet another width (hidden per direction, then
  Linear(2h, h) ReLU Linear(h, h)); we follow the LAMA code. LSTM dropout is 0 (paper's default).
- `mlp` (PEFT's MLP reparameterization, its recommended default): Linear(hidden, E) - ReLU -
  Linear(E, E) - ReLU - Linear(E, hidden). The paper's FewGLUE `mlp` has two layers; we follow PEFT.
Trainable: p*H + encoder; lstm: 8hH + 32h^2 + 32h (h = E/2) + E^2 + E + E*H + H;
mlp: 2*E*H + E^2 + 2E + H (H = hidden). Stored: p * H.

Placement. A boolean `soft_mask` (batch, seq) marks the soft positions; the i-th marked position
of each row gets prompt vector i (paper's code: the i-th `[PROMPT]` pseudo-token gets h_i). Without
marked positions (today's E2E task) all p vectors are prepended, as in prompt tuning
(`n_prepended = p`); with them nothing is prepended (`n_prepended = 0`). `insert_soft` builds such
rows from token segments. Why a mask and not a placeholder id (the paper adds a new `[PROMPT]`
token to the vocabulary): ids would need a vocabulary slot, and the ids that exist in every
vocabulary collide with real text (SmolLM2: pad = eos = 2, and E2E targets end with eos), so a
mask cannot be confused with a token and needs no resized embedding matrix. The ids at soft
positions are never read (any valid id, `insert_soft` writes 0).

Backbones. causal (GPT-2, Llama): the prompts go into the input. masked / encoder (BERT, the
paper's LAMA and SuperGLUE backbones): into the input; prepended ones sit before [CLS], as in
PEFT, and a linear head pools [CLS] at position p (`n_prepended`). seq2seq (T5, BART): into the
ENCODER input only (prepended or at soft positions), the extended mask serving the decoder's
cross-attention too; the decoder is untouched. PEFT's SEQ_2_SEQ_LM P_TUNING allocates 2p encoder
inputs (num_transformer_submodules=2) and uses the first p outputs for the encoder, the rest
never: with the MLP (row-wise) that is our computation with p unused rows; with the LSTM it is
not, since the bidirectional LSTM then also reads the p unused rows. PEFT with
num_transformer_submodules=1 is ours exactly for both encoders (tests/test_p_tuning_seq2seq_masked.py).

Positions: prepended vectors take 0..p-1 and real tokens count on from p; soft positions inside
the sequence are ordinary positions. Both skip pads (`_position_ids`), so left- and right-padded
rows give the same logits in training and in generate(). PEFT drops position_ids: identical for
unpadded input, but there a left-padded row's tokens are shifted by its padding. Encoder-decoders
take no position ids: their encoder rows (ids, mask, soft mask alike) are reordered
real-tokens-first (`real_tokens_first`), which gives BART's learned absolute positions the
unpadded numbering (T5's relative positions never depended on padding).

Differences from the paper: the paper also fine-tunes a few anchor tokens and, for SuperGLUE,
the whole LM (the frozen-LM setting is its LAMA one); the template language that emits soft
positions belongs to the task side (not written yet).

Generation goes through transformers' generate(inputs_embeds=...), greedy and beam search alike
(tests/test_p_tuning.py, tests/test_p_tuning_seq2seq_masked.py): decoder-only models return only
the new tokens; encoder-decoders return the decoder's start token first, which is dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from ptune.errors import PtuneError
from ptune.methods.base import Method, real_tokens_first

ENCODERS = ("lstm", "mlp")
KINDS = ("causal", "seq2seq", "masked", "encoder")


class PTuning(Method):
    name = "p-tuning"
    acts_on = "input"
    peft_type = "P_TUNING"

    def __init__(self, backbone, *, num_virtual_tokens: int, encoder: str, encoder_hidden_size: int | None, **_):
        super().__init__(backbone)
        if backbone.kind not in KINDS:
            raise PtuneError(f"method=p-tuning does not support model.kind={backbone.kind!r}; use one of {', '.join(KINDS)}")
        if encoder not in ENCODERS:
            raise PtuneError(f"method.encoder={encoder!r} is not one of {', '.join(ENCODERS)}; use method.encoder=lstm")
        hidden = self.dims.hidden
        width = hidden if encoder_hidden_size is None else encoder_hidden_size
        if not isinstance(width, int) or isinstance(width, bool) or width < 1 or (encoder == "lstm" and width % 2):
            rule = "an even integer >= 2 (half of it per LSTM direction)" if encoder == "lstm" else "an integer >= 1"
            raise PtuneError(f"method.encoder_hidden_size={encoder_hidden_size!r} is invalid: must be {rule} or null")
        self.num_virtual_tokens = self.n_prepended = num_virtual_tokens
        self.encoder, self.encoder_hidden_size = encoder, width
        self.collapsed = False  # True once an adapter's (p, hidden) prompt replaced the encoder
        # (p, hidden) encoder input, N(0, 1) as paper and PEFT
        self.embedding = nn.Embedding(self.num_virtual_tokens, hidden)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(input_size=hidden, hidden_size=width // 2, num_layers=2, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, hidden))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                          nn.Linear(width, hidden))

    def prompt_embeddings(self) -> torch.Tensor:
        """The p continuous prompt vectors, (p, hidden), float32."""
        if self.collapsed:
            return self.prompt
        x = self.embedding.weight.unsqueeze(0)  # (1, p, hidden): one sequence through the LSTM
        if self.encoder == "lstm":
            # float32 even under bf16/fp16 autocast: oneDNN has no bf16 LSTM on CPUs without AVX-512
            # (it fails to build its kernel on this image's AMD EPYC), and one sequence of p rows
            # costs nothing next to the backbone; the MLP after it runs under autocast as before.
            with torch.autocast(x.device.type, enabled=False):
                x = self.lstm_head(x.float())[0]  # (1, p, E): both directions concatenated
        return self.mlp_head(x)[0]  # (p, hidden)

    def soft_prompt(self) -> torch.Tensor:
        return self.prompt_embeddings()  # (p, hidden) float32

    # -- forward -------------------------------------------------------------------------------
    def _soft(self, soft_mask: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """soft_mask as bool (batch, seq), or None when it marks nothing (then prompts are prepended)."""
        if soft_mask is None or not soft_mask.any():
            return None
        soft = soft_mask.bool()
        if (soft & (attention_mask == 0)).any():
            raise PtuneError("soft_mask marks padded positions; mark only real positions (attention_mask == 1)")
        counts = soft.sum(-1)  # (batch,)
        if (counts != self.num_virtual_tokens).any():
            raise PtuneError(f"soft_mask marks {counts.tolist()} positions per row; every row needs exactly "
                             f"method.num_virtual_tokens={self.num_virtual_tokens}")
        return soft

    def model_inputs(self, input_ids, attention_mask, soft_mask=None):
        """Backbone kwargs. input_ids, attention_mask, soft_mask (optional, bool): (batch, seq).

        Sets n_prepended for this call (p without soft positions, else 0): lm_loss reads it right
        after model_inputs to strip the prepended positions. Encoder-decoders: the encoder's inputs
        (the mask also serves cross-attention), rows reordered real-tokens-first.
        """
        if self.dims.is_encoder_decoder:
            attention_mask, input_ids, *soft = real_tokens_first(attention_mask, input_ids,
                                                                 *([] if soft_mask is None else [soft_mask]))
            soft_mask = soft[0] if soft else None
        embeds = self.backbone.model.get_input_embeddings()(input_ids)  # (batch, seq, hidden)
        prompt = self.prompt_embeddings().to(embeds.dtype)  # (p, hidden)
        soft = self._soft(soft_mask, attention_mask)
        self.n_prepended = self.num_virtual_tokens if soft is None else 0
        if soft is not None:
            rank = (soft.long().cumsum(-1) - 1).clamp(min=0)  # (batch, seq): i at the i-th soft position
            embeds = torch.where(soft.unsqueeze(-1), prompt[rank], embeds)  # (batch, seq, hidden)
            inputs = dict(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
            pos = self._position_ids(attention_mask, 0)  # soft positions are ordinary positions
            if pos is not None:
                inputs["position_ids"] = pos
            return inputs
        # Prepended, as prompt.py does it: a little honest duplication rather than a shared helper
        # between two methods whose placement rules differ.
        batch = input_ids.shape[0]
        ones = attention_mask.new_ones(batch, self.num_virtual_tokens)
        mask = torch.cat([ones, attention_mask], dim=1)  # (batch, p + seq)
        embeds = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)  # (batch, p + seq, hidden)
        inputs = dict(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        real = self._position_ids(attention_mask, self.num_virtual_tokens)  # (batch, seq): p, p+1, ... skipping pads
        if real is not None:
            virtual = torch.arange(self.num_virtual_tokens, device=real.device).expand(batch, -1)  # (batch, p)
            inputs["position_ids"] = torch.cat([virtual, real], dim=1)  # (batch, p + seq)
        return inputs

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, soft_mask=None, **gen_kwargs):
        """New tokens only, (batch * num_return_sequences, new_len); soft_mask as in model_inputs."""
        if self.backbone.kind not in ("causal", "seq2seq"):
            raise PtuneError(f"model {self.backbone.name} ({self.backbone.kind}) does not generate; use a "
                             f"classification task, or a causal or seq2seq model for generation")
        # Decoder-only: with inputs_embeds and no input_ids, generate() returns only the new tokens;
        # it extends the position ids by one per step and copies them per beam. Encoder-decoder:
        # the encoder runs once on inputs_embeds, and the output starts with the decoder start token.
        inputs = self.model_inputs(input_ids, attention_mask, soft_mask)
        inputs.pop("use_cache")
        out = self.backbone.model.generate(**inputs, **gen_kwargs)
        return out[:, 1:] if self.dims.is_encoder_decoder else out

    # -- saving --------------------------------------------------------------------------------
    @torch.no_grad()
    def adapter_tensors(self):
        # Under no_grad, like generate(): PyTorch's CPU LSTM takes another kernel when autograd is
        # on (outputs differ by ~3e-8), and the stored prompt must equal the one evaluation used.
        return {"prompt": self.prompt_embeddings().float().contiguous()}  # (p, hidden)

    def load_adapter_tensors(self, tensors):
        """Load the encoder's output for inference: the encoder is dropped, the prompt is frozen."""
        prompt = tensors["prompt"]
        if tuple(prompt.shape) != (self.num_virtual_tokens, self.dims.hidden):
            raise PtuneError(f"adapter prompt has shape {tuple(prompt.shape)}, this model needs "
                             f"{(self.num_virtual_tokens, self.dims.hidden)}; set method.num_virtual_tokens to the "
                             f"adapter's length")
        device = self.embedding.weight.device if not self.collapsed else self.prompt.device
        if not self.collapsed:
            del self.embedding, self.mlp_head
            if self.encoder == "lstm":
                del self.lstm_head
            self.collapsed = True
        self.prompt = nn.Parameter(prompt.float().to(device).clone(), requires_grad=False)

    def adapter_config(self):
        return dict(method=self.name, num_virtual_tokens=self.num_virtual_tokens, token_dim=self.dims.hidden,
                    encoder=self.encoder,
                    encoder_hidden_size=self.encoder_hidden_size,
                    layout="(p, hidden), the prompt encoder's output, in the " + ("encoder input" if self.dims.is_encoder_decoder else "input")
                    + "; PEFT prompt_embeddings (rename prompt -> prompt_embeddings)")


def insert_soft(segments: list[list[int]], n_soft_per_gap: list[int], filler_id: int = 0) -> tuple[list[int], list[bool]]:
    """One row with soft positions around and between token segments.

    segments: k lists of token ids; n_soft_per_gap: k + 1 counts -- soft positions before
    segment 0, between consecutive segments, after the last. Returns (input_ids, soft_mask), both
    of the row's length; soft positions hold `filler_id`, never read (0 exists in every vocabulary).
    Example: insert_soft([[a, b], [c]], [2, 1, 0]) -> ([0, 0, a, b, 0, c], [T, T, F, F, T, F]).
    """
    if len(n_soft_per_gap) != len(segments) + 1 or any(n < 0 for n in n_soft_per_gap):
        raise PtuneError(f"insert_soft needs {len(segments) + 1} counts >= 0 for {len(segments)} segments, "
                         f"got {list(n_soft_per_gap)}")
    ids, soft = [filler_id] * n_soft_per_gap[0], [True] * n_soft_per_gap[0]
    for segment, n in zip(segments, n_soft_per_gap[1:]):
        ids += list(segment) + [filler_id] * n
        soft += [False] * len(segment) + [True] * n
    return ids, soft

"""Hard prompt — the "prompt design" baseline (Brown et al. 2020; Lester et al. 2021, Fig. 1).

Nothing is trained: the task's template (for E2E, `task.source_template`) is the whole method.
It gives the zero-shot score that every trained method must beat, through the same evaluation
code. `ptune train method=hard-prompt` skips the optimizer and only evaluates. PEFT has no
equivalent (it always adds tensors).

Backbones: causal LMs continue the template; encoder-decoders (T5, BART) read it with the
encoder and generate with the decoder. Under `task.head=verbalizer` (ptune/heads/verbalizer.py) the
template and its label words are the zero-shot classifier of every backbone with an LM head,
BERT's MLM head included; a masked model with an lm head (nothing to generate) or a linear head
(only the random head would train) is refused by ptune.build.attach_head.
"""

from __future__ import annotations

import torch

from ptune.errors import PtuneError
from ptune.methods.base import Method, real_tokens_first


class HardPrompt(Method):
    name = "hard-prompt"
    acts_on = "none"
    trains = False

    def __init__(self, backbone, **_):
        super().__init__(backbone)
        self._check_backbone(backbone)

    def _check_backbone(self, backbone) -> None:
        # masked (BERT) only through a verbalizer head (ptune.build.attach_head refuses lm and linear);
        # an encoder without an LM head (MiniLM) has no way to answer without training.
        if backbone.kind not in ("causal", "seq2seq", "masked"):
            raise PtuneError(f"method=hard-prompt on {backbone.kind} models (no LM head) has nothing to predict with; "
                             f"use a model with an LM head and task.head=verbalizer, or another method")

    def model_inputs(self, input_ids, attention_mask):
        # Encoder-decoders take these for the encoder (the seq2seq head adds the decoder's inputs).
        # They take no position_ids, and BART numbers its encoder positions from the first slot:
        # real tokens go first, so a left-padded row reads as it does alone (see real_tokens_first).
        if self.dims.is_encoder_decoder:
            attention_mask, input_ids = real_tokens_first(attention_mask, input_ids)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        pos = self._position_ids(attention_mask, 0)
        if pos is not None:
            inputs["position_ids"] = pos
        return inputs

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **gen_kwargs):
        """New tokens only: after the prompt (causal) or after the decoder start token (seq2seq)."""
        model = self.backbone.model
        if self.dims.is_encoder_decoder:
            attention_mask, input_ids = real_tokens_first(attention_mask, input_ids)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
            return out[:, 1:]  # the decoder sequence opens with its one start token
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
        return out[:, input_ids.shape[1]:]

    def adapter_tensors(self):
        return {}

    def load_adapter_tensors(self, tensors):
        pass

    def adapter_config(self):
        return {"method": self.name}

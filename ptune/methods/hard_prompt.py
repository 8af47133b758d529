"""Hard prompt — the "prompt design" baseline (Brown et al. 2020; Lester et al. 2021, Fig. 1).

Nothing is trained: the task's template (for E2E, `task.source_template`) is the whole method.
It gives the zero-shot score that every trained method must beat, through the same evaluation
code. `ptune train method=hard-prompt` skips the optimizer and only evaluates. PEFT has no
equivalent (it always adds tensors).

Backbones: causal LMs continue the template; encoder-decoders (T5, BART) read it with the
encoder and generate with the decoder. A masked model (BERT) has nothing to generate, and under a
linear head a hard prompt leaves only the random head to train: a hard prompt on BERT needs a
verbalizer (label words read at [MASK]), which ptune does not have yet, so it is refused.
"""

from __future__ import annotations

import torch

from ptune.errors import PtuneError
from ptune.methods.base import Method, real_tokens_first


class HardPrompt(Method):
    name = "hard-prompt"

    def __init__(self, backbone, **_):
        super().__init__(backbone)
        self._check_backbone(backbone)

    def _check_backbone(self, backbone) -> None:
        if backbone.kind not in ("causal", "seq2seq"):
            raise PtuneError(f"method=hard-prompt on {backbone.kind} models needs a verbalizer head, which is not "
                             f"available yet; use a causal or seq2seq model, or another method")

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

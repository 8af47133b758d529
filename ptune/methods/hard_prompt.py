"""Hard prompt — the "prompt design" baseline (Brown et al. 2020; Lester et al. 2021, Fig. 1).

Nothing is trained: the task's template (for E2E, `task.source_template`) is the whole method.
It gives the zero-shot score that every trained method must beat, through the same evaluation
code. `ptune train method=hard-prompt` skips the optimizer and only evaluates. PEFT has no
equivalent (it always adds tensors).
"""

from __future__ import annotations

import torch

from ptune.methods.base import Method


class HardPrompt(Method):
    name = "hard-prompt"

    def __init__(self, backbone, **_):
        super().__init__(backbone)

    def model_inputs(self, input_ids, attention_mask):
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        pos = self._position_ids(attention_mask, 0)
        if pos is not None:
            inputs["position_ids"] = pos
        return inputs

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **gen_kwargs):
        out = self.backbone.model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
        return out[:, input_ids.shape[1]:]

    def adapter_tensors(self):
        return {}

    def load_adapter_tensors(self, tensors):
        pass

    def adapter_config(self):
        return {"method": self.name}

"""The soft verbalizer — Hambardzumyan, Khachatrian & May 2021, "WARP: Word-level Adversarial
ReProgramming" (`task.head=soft-verbalizer`; with method=prompt this is WARP).

One trained vector per class, scored against the representation at the template's {mask}:

    logits = h · W^T + b,   h (batch, d) at the mask (mask_state.py),  W (n_classes, d),  b (n_classes,)

WARP puts its class vectors in the space of the MLM's output word embeddings: h is what the LM's
output embedding reads (BERT/RoBERTa: after the MLM transform; GPT-2, Llama: the last hidden
state; T5: the rescaled decoder output), and class c starts as its label word's output
embedding (and the output layer's bias at it, where there is one), so before training the head
scores each class as the LM scores its label word. Label words are those of `task.verbalizer`, in
the pieces the word verbalizer scores; a word of several pieces starts as the mean of its pieces'
embeddings, a class of several words as the mean of its words' (WARP's words are single tokens).

Encoders without an LM head (model=minilm) have no output embeddings: h is the last hidden state
at the mask token, and W is drawn N(0, 0.02) from a generator seeded with the run's seed (as the
linear head), b = 0.

Differences from WARP: WARP trains with its own schedule and prompt layout (prompt tokens around
the input, RoBERTa-large); here the method (prompt, prefix, p-tuning, ...) and the trainer are
ptune's, and the soft verbalizer is a head under every method. BART's `final_logits_bias` (zeros
in the released checkpoints) is not part of the init. method=hard-prompt trains nothing and is
refused by ptune.build.attach_head (only the head would train: run that as method=fine-tune
method.trainable=head); zero-shot label words are task.head=verbalizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptune.heads.mask_state import MaskStateHead
from ptune.heads.verbalizer import label_pieces


class SoftVerbalizerHead(MaskStateHead):
    """Parameters `weight` (n_classes, d) and `bias` (n_classes,): `head.weight`, `head.bias` in adapters."""

    def __init__(self, backbone, words: list[list[tuple[int, ...]]], labels: list[str], *, seed: int):
        super().__init__(backbone)
        out = backbone.model.get_output_embeddings() if backbone.kind != "encoder" else None
        self.labels, self.words = labels, words
        if out is None:
            self.space, self.init = "hidden", "random N(0, 0.02)"
            generator = torch.Generator().manual_seed(seed)
            weight = torch.empty(len(labels), backbone.dims.hidden).normal_(0.0, 0.02, generator=generator)
            bias = torch.zeros(len(labels))
        else:
            self.space, self.init = "output", "label words' output embeddings"
            table = out.weight.detach().float().cpu()  # (vocab, d)
            out_bias = out.bias.detach().float().cpu() if getattr(out, "bias", None) is not None else None
            weight = torch.stack([torch.stack([table[list(w)].mean(0) for w in ws]).mean(0) for ws in words])
            bias = (torch.stack([torch.stack([out_bias[list(w)].mean() for w in ws]).mean() for ws in words])
                    if out_bias is not None else torch.zeros(len(labels)))
        self.weight = nn.Parameter(weight.clone())  # (n_classes, d)
        self.bias = nn.Parameter(bias.clone())  # (n_classes,)

    def from_parts(self, states: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, d) states at the mask -> (batch, n_classes) logits."""
        return F.linear(states.float(), self.weight, self.bias)

    def config(self) -> dict:
        n, d = self.weight.shape
        return {"kind": "soft-verbalizer", "labels": self.labels, "space": self.space, "init": self.init,
                "word_pieces": [[list(w) for w in ws] for ws in self.words], "hidden": d, "n_classes": n,
                "tensors": "head.weight (n_classes, hidden), head.bias (n_classes,): logits = h_mask W^T + b"}


def build(task, backbone, method, seed: int, saved) -> SoftVerbalizerHead:
    """task.head=soft-verbalizer: a class vector per label, from its label words."""
    return SoftVerbalizerHead(backbone, label_pieces(task, backbone), list(task.labels), seed=seed)

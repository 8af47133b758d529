"""The `linear` head (classification): one vector per example (`pool`) -> dropout -> a trained
Linear(hidden, n_classes) (`LinearHead`, attached by ptune.build as `method.head`), as in
P-tuning v2's sequence classifiers and BertForSequenceClassification. `class_loss` is its
cross-entropy; seq2seq backbones pool the decoder's first state (ptune/heads/lm.py's forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptune.errors import PtuneError
from ptune.heads.lm import seq2seq_forward
from ptune.methods.base import Method


class LinearHead(nn.Module):
    """dropout, then Linear(hidden, n_classes): pooled (batch, hidden) -> logits (batch, n_classes).

    As P-tuning v2's classifiers and BertForSequenceClassification: dropout p (their default is
    BERT's hidden_dropout_prob, 0.1), weight ~ N(0, 0.02), bias 0. The weights are drawn from a
    generator seeded with the run's seed, not from the global stream: every method on one seed
    starts from the same head, and attaching a head changes no other random draw of the run.
    Parameters are `weight` (n_classes, hidden) and `bias` (n_classes,): `head.weight` and
    `head.bias` in adapters and checkpoints.
    """

    def __init__(self, hidden: int, n_classes: int, dropout: float = 0.1, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.empty(n_classes, hidden).normal_(0.0, 0.02, generator=generator))
        self.bias = nn.Parameter(torch.zeros(n_classes))
        self.dropout = dropout

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        pooled = F.dropout(pooled.to(self.weight.dtype), self.dropout, self.training)
        return F.linear(pooled, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"hidden={self.weight.shape[1]}, n_classes={self.weight.shape[0]}, dropout={self.dropout}"


def pool(method: Method, input_ids, attention_mask) -> torch.Tensor:
    """One hidden vector per example, (batch, hidden), where the backbone kind keeps its summary:

    - masked / encoder (BERT): [CLS], the first real position after the method's prepended ones
      (P-tuning v2 and BERT read [CLS]; ptune's masked backbones carry no NSP pooler, see
      tasks/classification.py);
    - causal: the last real token, the only one whose state has seen the whole input (as
      transformers' *ForSequenceClassification for decoder-only models);
    - seq2seq: the decoder's state at its first position, fed the decoder_start token; it reads
      the whole encoded input through cross-attention (Sentence-T5's encoder-decoder pooling).

    input_ids, attention_mask: (batch, seq). Positions come from the attention mask, never from
    pad ids (SmolLM2's pad is its EOS), so left- and right-padded batches pool the same token.
    """
    model = method.backbone.model
    if method.backbone.kind == "seq2seq":
        # Every method's model_inputs puts an encoder row's real tokens first (real_tokens_first),
        # so a left-padded row pools as it does alone; nothing to reorder here.
        start = model.config.decoder_start_token_id
        if start is None:
            raise PtuneError(f"model {method.backbone.name} sets no decoder_start_token_id, which the linear head's "
                             f"seq2seq pooling feeds to the decoder; set it in the model's config")
        decoder_input_ids = input_ids.new_full((input_ids.shape[0], 1), start)  # (batch, 1)
        out = seq2seq_forward(method, input_ids, attention_mask, decoder_input_ids, output_hidden_states=True)
        return out.decoder_hidden_states[-1][:, 0]  # the decoder's final (normalised) output
    inputs = method.model_inputs(input_ids, attention_mask)
    hidden = model.base_model(**inputs).last_hidden_state[:, method.n_prepended:]  # (batch, seq, hidden)
    if method.backbone.kind == "causal":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        index = (positions * attention_mask).argmax(-1)  # (batch,): last position whose mask is 1
    else:
        index = attention_mask.argmax(-1)  # (batch,): argmax returns the first maximum = first real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def class_logits(method: Method, input_ids, attention_mask) -> torch.Tensor:
    """(batch, n_classes) logits of the linear head that ptune.build attached as `method.head`."""
    head = getattr(method, "head", None)
    if head is None:
        raise PtuneError("this method has no classification head; train with task.head=linear")
    # The trainer switches only the backbone between train() and eval(); the head's dropout
    # follows it, so one switch governs every dropout of the forward.
    head.train(method.backbone.model.training)
    return head(pool(method, input_ids, attention_mask))


def class_loss(method: Method, input_ids, attention_mask, labels, **_) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch and the number of examples.

    input_ids, attention_mask: (batch, seq); labels: (batch,) class indices.
    """
    logits = class_logits(method, input_ids, attention_mask)
    return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.shape[0]


KEYS = ("head_dropout",)  # the task keys this head alone reads


def check_options(values: dict, task) -> dict:
    """task.head_dropout: a number in [0, 1)."""
    dropout = values["head_dropout"]
    if isinstance(dropout, bool) or not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise PtuneError(f"task.head_dropout={dropout!r} is invalid: must be a number in [0, 1)")
    return {"head_dropout": float(dropout)}


def build(task, backbone, method, seed: int, saved) -> LinearHead:
    """task.head=linear: a classifier over the task's labels, its weights drawn from the run's seed."""
    if not method.trains:
        # By definition it trains nothing; with a trained head it would be a linear probe, which
        # is fine-tune's `trainable=head` (and reported as such, with its trainable count).
        raise PtuneError(f"method={method.name} trains nothing, so task.head=linear would train only the classifier "
                         f"on a frozen backbone (a linear probe); run that as method=fine-tune method.trainable=head")
    return LinearHead(backbone.dims.hidden, len(task.labels), task.head_options["head_dropout"], seed=seed)

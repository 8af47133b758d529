"""Heads turn the backbone's hidden states into a loss.

`lm`: next-token cross-entropy on the positions that carry labels (labels == -100 elsewhere).
Logits are computed only at those positions: for E2E the table and the virtual tokens need none,
and the (hidden x vocab) projection is the largest matmul of a small LM (about a fifth of
SmolLM2-135M's FLOPs), so this roughly halves its cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptune.methods.base import Method


def loss(method: Method, batch: dict) -> tuple[torch.Tensor, int]:
    """The loss a batch's layout calls for (see ptune.data.Example): (summed loss, number of terms)."""
    layout = batch.get("layout", "causal")
    tensors = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if layout == "causal":
        return lm_loss(method, **tensors)
    raise NotImplementedError(f"no loss for batch layout {layout!r} yet")


def lm_loss(method: Method, input_ids, attention_mask, labels, **_) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy and the number of label tokens.

    input_ids, attention_mask, labels: (batch, seq). Returns (scalar sum, count): the trainer
    divides by the label-token count of the whole optimizer step (all micro-batches and
    processes), so accumulation and multi-process training give the same gradient as one batch.
    """
    model = method.backbone.model
    hidden = model.base_model(**method.model_inputs(input_ids, attention_mask)).last_hidden_state
    hidden = hidden[:, method.n_prepended:]  # (batch, seq, hidden)
    target = labels[:, 1:]  # token t+1 is predicted at position t
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (n_label_tokens, vocab)
    loss = F.cross_entropy(logits.float(), target[keep], reduction="sum")
    return loss, int(keep.sum())

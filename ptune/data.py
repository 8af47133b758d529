"""Examples and batches: one tokenized example (`Example`), padding a list of them into tensors
(`collate`) and deterministic subsets (`subsample`). Both wings use them; which examples form each
training step is the training wing's (ptune.train.plan).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

LAYOUTS = ("causal", "seq2seq", "class", "slot")


@dataclass
class Example:
    """One tokenized training example; `layout` says how labels relate to input_ids and which loss
    `ptune.heads.loss` takes:

    - causal:  labels align with input_ids (source + target), -100 where no loss is taken;
    - seq2seq: input_ids is the encoder's source, labels the decoder's target (own length);
    - class:   labels is [class index] (one loss term per example);
    - slot:    labels is [class index] (or [token id] for LAMA), scored at `mask_pos`, the index of
               the template's {mask} in input_ids (ptune.heads.verbalizer); `masks` (optional): the index of every
               named slot {mask:a} ... {mask:b}, in template order (the rules head, ptune/heads/rules.py).
    `soft` (optional, input_ids' length): True at a template's {soft} positions (p-tuning).
    """

    input_ids: list[int]
    labels: list[int]
    layout: str = "causal"
    soft: list[bool] | None = None
    mask_pos: int | None = None
    masks: list[int] | None = None

    def n_loss_terms(self) -> int:
        """How many terms this example adds to the summed loss (the trainer normalises by the step's total)."""
        if self.layout == "causal":  # token t+1 is predicted at t: the first position is never a target
            return sum(1 for t in self.labels[1:] if t != -100)
        if self.layout == "seq2seq":
            return sum(1 for t in self.labels if t != -100)
        return 1


def collate(examples: list[Example], pad_id: int, padding_side: str = "right") -> dict:
    """Pad to the longest example.

    Returns input_ids and attention_mask (batch, max_len), labels, and `layout` (a str, read by
    `ptune.heads.loss`). labels: causal (batch, max_len) padded like input_ids; seq2seq
    (batch, max_target_len) right-padded with -100; class and slot (batch,). With examples that
    carry `soft`: soft_mask (batch, max_len) bool, padded like input_ids. slot: mask_pos (batch,),
    each the index in the example's own ids (padding not counted, whatever the side); with examples
    that carry `masks`, mask_positions (batch, n_slots), counted the same way.
    """
    layout = examples[0].layout
    if any(e.layout != layout for e in examples):
        raise ValueError("a batch mixes example layouts")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    if layout == "causal":
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
    elif layout == "seq2seq":
        labels = torch.full((len(examples), max(len(e.labels) for e in examples)), -100, dtype=torch.long)
    else:
        labels = torch.tensor([e.labels[0] for e in examples], dtype=torch.long)
    soft = torch.zeros((len(examples), width), dtype=torch.bool) if any(e.soft for e in examples) else None
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, sl] = torch.tensor(e.input_ids)
        mask[row, sl] = 1
        if soft is not None and e.soft:
            soft[row, sl] = torch.tensor(e.soft, dtype=torch.bool)
        if layout == "causal":
            labels[row, sl] = torch.tensor(e.labels)
        elif layout == "seq2seq":
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "layout": layout}
    if soft is not None:
        out["soft_mask"] = soft
    if layout == "slot":
        out["mask_pos"] = torch.tensor([e.mask_pos for e in examples], dtype=torch.long)
        if examples[0].masks is not None:
            out["mask_positions"] = torch.tensor([e.masks for e in examples], dtype=torch.long)
    return out


def subsample(n_total: int, n: int | None, seed: int = 0) -> list[int]:
    """A deterministic subset of n indices (all if n is None or >= n_total), in original order."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), n))

"""Batches: a deterministic plan of which examples form each optimizer step, and collation.

The plan is a pure function of (seed, epoch), so the data position of a checkpoint is just the
step number: resume rebuilds the same plan and skips to it, with no sampler state to save.

Length grouping (on by default): each epoch is shuffled, cut into mega-batches of 50 steps, each
mega-batch sorted by length and cut into steps, and the steps shuffled again. Padding then costs
little while the order stays random at the scale of an epoch.
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
               the template's {mask} in input_ids (ptune.verbalizer).
    `soft` (optional, input_ids' length): True at a template's {soft} positions (p-tuning).
    """

    input_ids: list[int]
    labels: list[int]
    layout: str = "causal"
    soft: list[bool] | None = None
    mask_pos: int | None = None

    def n_loss_terms(self) -> int:
        """How many terms this example adds to the summed loss (the trainer normalises by the step's total)."""
        if self.layout == "causal":  # token t+1 is predicted at t: the first position is never a target
            return sum(1 for t in self.labels[1:] if t != -100)
        if self.layout == "seq2seq":
            return sum(1 for t in self.labels if t != -100)
        return 1


def epoch_plan(lengths: list[int], step_size: int, seed: int, epoch: int, group_by_length: bool = True) -> list[list[int]]:
    """Indices of each optimizer step of one epoch; the last incomplete step is dropped.

    step_size = examples per optimizer step over all processes and micro-batches.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = step_size * 50
        order = [i for s in range(0, len(order), mega) for i in sorted(order[s:s + mega], key=lambda i: -lengths[i])]
    steps = [order[s:s + step_size] for s in range(0, len(order) - step_size + 1, step_size)]
    if group_by_length:
        rng.shuffle(steps)
    return steps


def micro_batches(step_indices: list[int], grad_accum: int, world: int, rank: int) -> list[list[int]]:
    """Split one optimizer step into grad_accum micro-batches and keep this process's share.

    The step is sorted by length first so each micro-batch holds similar lengths (less padding).
    """
    n = len(step_indices) // grad_accum
    chunks = [step_indices[k * n:(k + 1) * n] for k in range(grad_accum)]
    per_rank = n // world
    return [c[rank * per_rank:(rank + 1) * per_rank] for c in chunks]


def collate(examples: list[Example], pad_id: int, padding_side: str = "right") -> dict:
    """Pad to the longest example.

    Returns input_ids and attention_mask (batch, max_len), labels, and `layout` (a str, read by
    `ptune.heads.loss`). labels: causal (batch, max_len) padded like input_ids; seq2seq
    (batch, max_target_len) right-padded with -100; class and slot (batch,). With examples that
    carry `soft`: soft_mask (batch, max_len) bool, padded like input_ids. slot: mask_pos (batch,),
    each the index in the example's own ids (padding not counted, whatever the side).
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
    return out


def subsample(n_total: int, n: int | None, seed: int = 0) -> list[int]:
    """A deterministic subset of n indices (all if n is None or >= n_total), in original order."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), n))

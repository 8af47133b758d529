"""The data plan: which examples form each optimizer step, a pure function of (seed, epoch).

So the data position of a checkpoint is just the step number: resume rebuilds the same plan and
skips to it, with no sampler state to save.

Length grouping (on by default): each epoch is shuffled, cut into mega-batches of 50 steps, each
mega-batch sorted by length and cut into steps, and the steps shuffled again. Padding then costs
little while the order stays random at the scale of an epoch.
"""

from __future__ import annotations

import random


def epoch_plan(lengths: list[int], step_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
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

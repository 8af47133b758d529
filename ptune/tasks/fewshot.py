"""The few-shot protocol of LM-BFF (Gao, Fisch & Chen 2021, "Making Pre-trained Language Models
Better Few-shot Learners", §2 and their tools/generate_k_shot_data.py).

`task.few_shot=K` with `task.few_shot_seed=s`: the training split is shuffled with NumPy's legacy
generator seeded with s (as their script: `np.random.seed(s); np.random.shuffle(lines)`), then
walked in that order: the first K rows of each class form the few-shot training set, the next K
of each class its development set (model and prompt selection), so the two are disjoint and
stratified. The task's original development split becomes the reported test split. LM-BFF's
seeds are 13, 21, 42, 87, 100.

The same (rows, K, seed) always gives the same two sets, row for row: a sweep over seeds is a
sweep over data splits, and `ptune report` aggregates over `task.few_shot_seed`.
"""

from __future__ import annotations

import numpy as np

from ptune.errors import PtuneError

SEEDS = (13, 21, 42, 87, 100)  # LM-BFF's five data seeds


def split(rows: list[dict], n_classes: int, k: int, seed: int, labels=None) -> tuple[list[dict], list[dict]]:
    """(train, dev): K rows per class each, disjoint, drawn as the module docstring says.

    rows: dicts with an integer `label` in [0, n_classes). Each set keeps the shuffled order.
    PtuneError when a class has fewer than 2K rows (both sets need K of it)."""
    order = np.random.RandomState(seed).permutation(len(rows))  # == np.random.seed(s); np.random.shuffle
    train, dev = [], []
    taken = [0] * n_classes
    for i in order.tolist():
        y = rows[i]["label"]
        if taken[y] < k:
            train.append(rows[i])
        elif taken[y] < 2 * k:
            dev.append(rows[i])
        else:
            continue
        taken[y] += 1
    short = [c for c in range(n_classes) if taken[c] < 2 * k]
    if short:
        c = short[0]
        name = labels[c] if labels else c
        raise PtuneError(f"task.few_shot={k} needs {2 * k} training rows of class {name!r} ({k} to train on, {k} for the "
                         f"few-shot dev set) and the training split has {taken[c]}; lower task.few_shot")
    return train, dev


def check(k, seed, max_train_samples, default_seed) -> None:
    """One-line errors for the few-shot keys (`default_seed`: the task file's few_shot_seed)."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise PtuneError(f"task.few_shot={k!r} is invalid: the number of training examples per class, an integer >= 1 "
                         f"(or null for the full training split)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PtuneError(f"task.few_shot_seed={seed!r} is invalid: must be an integer (LM-BFF: 13, 21, 42, 87, 100)")
    if k is None and seed != default_seed:
        raise PtuneError(f"task.few_shot_seed={seed} chooses the K-shot split, and task.few_shot=null trains on the "
                         f"whole training split; set task.few_shot=K, or leave task.few_shot_seed={default_seed}")
    if k is not None and max_train_samples is not None:
        raise PtuneError(f"task.few_shot={k} and task.max_train_samples={max_train_samples} both choose the training "
                         f"rows; set one of them")

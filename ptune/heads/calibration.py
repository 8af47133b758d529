"""Contextual calibration — Zhao, Wallace, Feng, Klein & Singh 2021, "Calibrate Before Use:
Improving Few-Shot Performance of Language Models" (`task.calibrate=true`).

A prompted LM prefers some label words whatever the input. The paper estimates that bias from
content-free inputs, "N/A", "" and "[MASK]" written into every field of the prompt, and divides
it out: with p the class probabilities of an input and p_cf the mean of the content-free inputs'
probabilities,

    q = normalise(W p),  W = diag(p_cf)^-1,  b = 0      i.e.  q_c = (p_c / p_cf_c) / sum_k p_k / p_cf_k

Here p is the softmax of the head's class scores: the word verbalizer's log P(label words)
renormalised over the classes (as the paper renormalises the label tokens' probabilities), the
soft verbalizer's logits, the prototypical verbalizer's cosines (its P(y | x) = softmax S(v, c_y)).
Calibrated scores are log q = log_softmax(scores - log p_cf), so every caller that reads class
scores (argmax, ensembles' softmax) reads q.

When: at evaluation and prediction, never in training. p_cf is computed once per model state, by
the run's own task path (its template, demonstrations and head; content-free rows go through
`task.class_scores` uncalibrated) and kept until a tensor of the method changes (an optimizer
step, a loaded adapter): every evaluation during training recomputes it, `ptune predict` / `serve`
compute it once. The setting is task.calibrate in the run's config.yaml, and the adapter config's
head records it (`calibration`: the content-free strings and the rule).

Differences from the paper: the paper calibrates GPT-3's first-token probabilities of label names
in few-shot prompts; here any verbalizer-type head (multi-piece words scored whole). A linear head
is refused (its classes have no words and its training already fits a bias).
"""

from __future__ import annotations

import weakref

import torch

CONTENT_FREE = ("N/A", "", "[MASK]")
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # task -> (model-state key, p_cf)


def describe() -> dict:
    """What adapter_config.json's head records about calibration."""
    return {"method": "contextual calibration (Zhao et al. 2021)", "content_free": list(CONTENT_FREE),
            "rule": "q = normalise(p / p_cf); p = softmax of the class scores, p_cf = mean p of the content-free "
                    "inputs (each written into every template field), computed per model state at evaluation"}


def content_free_rows(fields) -> list[dict]:
    """One row per content-free string, every field filled with it (label 0: never read)."""
    return [{**{f: text for f in fields}, "label": 0} for text in CONTENT_FREE]


def calibrate(scores: torch.Tensor, p_cf: torch.Tensor) -> torch.Tensor:
    """(n, C) class scores, (C,) content-free probabilities -> (n, C) log q (module docstring)."""
    return torch.log_softmax(scores.float() - p_cf.float().log().to(scores.device), dim=-1)


def _state_key(method) -> tuple:
    """Changes when any tensor the method owns or trains changes (in-place updates bump a tensor's version)."""
    tensors = {id(t): t for t in [*method.parameters(), *method.trainable_tensors().values()]}
    return (id(method), *sorted((i, t._version) for i, t in tensors.items()))


def content_free_probs(task, method, batch_size: int) -> torch.Tensor:
    """(C,) p_cf: the mean over the content-free rows of the softmax of the task's uncalibrated scores."""
    key = _state_key(method)
    cached = _CACHE.get(task)
    if cached is not None and cached[0] == key:
        return cached[1]
    scores = task.class_scores(method, content_free_rows(task.input_fields), batch_size, calibrated=False)
    p_cf = torch.softmax(scores.float(), dim=-1).mean(0)
    _CACHE[task] = (key, p_cf)
    return p_cf


def apply(task, method, scores: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Calibrated log-probabilities (n, C) of `scores` (n, C) from `method` on `task`."""
    return calibrate(scores, content_free_probs(task, method, batch_size))
